"""DALLE2-pytorch state-dict names under every wrapper prefix torch and Accelerate put in front of them.

A reference file may have been saved through DistributedDataParallel (`module.`), torch.compile
(`_orig_mod.`), both, in either order, around the whole Decoder, around one U-Net inside it, or
both (models/reference_names.py, docs/MIGRATING.md). Whatever the wrapping, the names map to the
bare ones (`unets.{i}.<name>`), the non-network entries are dropped with their reason, and a
trainer checkpoint's Adam moments and EMA averages reach the same parameters.
"""

from __future__ import annotations

import itertools
from typing import Dict

import pytest
import torch

from dalle2_decoder.models.reference_names import (
    decoder_state_from_reference,
    decoder_state_from_reference_with_dropped,
    unet_state_from_reference,
)
from dalle2_decoder.tracking.reference import convert_checkpoint

WRAPPERS = ["", "module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module.", "module.module."]
COMBINATIONS = list(itertools.product(WRAPPERS, WRAPPERS))


def reference_unet(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))


def bare_decoder_state(unets) -> Dict[str, torch.Tensor]:
    return {
        f"unets.{i}.{name}": t.detach().clone() for i, unet in enumerate(unets) for name, t in unet.state_dict().items()
    }


def wrapped(state: Dict[str, torch.Tensor], outer: str, inner: str) -> Dict[str, torch.Tensor]:
    """Names as a wrapped Decoder (outer) around wrapped U-Nets (inner) saves them."""
    out = {}
    for name, tensor in state.items():
        _, index, rest = name.split(".", 2)
        out[f"{outer}unets.{index}.{inner}{rest}"] = tensor
    return out


@pytest.mark.parametrize("outer, inner", COMBINATIONS, ids=[f"[{o}]unets.i.[{i}]" for o, i in COMBINATIONS])
def test_decoder_names_map_to_the_bare_ones_under_any_wrapping(outer, inner):
    """Every U-Net entry maps to `unets.{i}.<bare name>` with its tensor; the reference Decoder's
    other entries (noise schedules, the low-res conditioner, its device buffer) are dropped with a
    reason, wrapped or not; an entry that is neither is an error naming it."""
    unets = [reference_unet(0), reference_unet(1)]
    bare = bare_decoder_state(unets)
    state = wrapped(bare, outer, inner)
    state[f"{outer}noise_schedulers.0.betas"] = torch.ones(3)
    state[f"{outer}lowres_conds.1.dummy"] = torch.ones(1)
    state[f"{outer}_dummy"] = torch.ones(1)
    mapped, dropped = decoder_state_from_reference_with_dropped(state)
    assert list(mapped) == list(bare)
    assert all(torch.equal(mapped[name], bare[name]) for name in bare)
    assert sorted(name for name, _ in dropped) == sorted(
        [f"{outer}noise_schedulers.0.betas", f"{outer}lowres_conds.1.dummy", f"{outer}_dummy"]
    )
    assert all(reason for _, reason in dropped)
    assert decoder_state_from_reference(state).keys() == bare.keys()
    with pytest.raises(ValueError, match="unexpected entry"):
        decoder_state_from_reference({**state, f"{outer}clip_adapter.weight": torch.ones(1)})


@pytest.mark.parametrize("prefix", WRAPPERS)
def test_unet_names_map_to_the_bare_ones_under_any_wrapping(prefix):
    """A U-Net's own state dict saved through any wrapper maps to its bare names; two entries that
    map to the same name (a wrapped and an unwrapped copy) are an error, not a silent overwrite."""
    unet = reference_unet(2)
    bare = {name: t.detach().clone() for name, t in unet.state_dict().items()}
    mapped = unet_state_from_reference({prefix + name: t for name, t in bare.items()})
    assert list(mapped) == list(bare) and all(torch.equal(mapped[n], bare[n]) for n in bare)
    if prefix:
        with pytest.raises(ValueError, match="both map to"):
            unet_state_from_reference({**bare, prefix + "0.weight": bare["0.weight"]})


def reference_checkpoint(outer: str, inner: str):
    """A DALLE2-pytorch trainer checkpoint of one trained U-Net (AdamW grouped as the reference
    groups it: decayed tensors of 2+ dimensions first), saved through the given wrappers."""
    unet = reference_unet(3)
    params = list(unet.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
    )
    for _ in range(2):
        optimizer.zero_grad()
        (unet(torch.randn(5, 3)) ** 2).sum().backward()
        optimizer.step()
    names = [name for name, _ in unet.named_parameters()]
    order = [n for n, p in unet.named_parameters() if p.ndim >= 2] + [
        n for n, p in unet.named_parameters() if p.ndim < 2
    ]
    saved = optimizer.state_dict()
    moments = {order[i]: saved["state"][i]["exp_avg"] for i in range(len(order))}
    ema = {f"0.ema_model.{inner}{name}": t.detach() * 0.5 for name, t in unet.state_dict().items()}
    ema.update({"0.step": torch.tensor(7), "0.initted": torch.tensor(True)})
    payload = {
        "model": wrapped(bare_decoder_state([unet]), outer, inner),
        "steps": torch.tensor([2]),
        "optim0": saved,
        "sched0": {"last_epoch": 2},
        "ema": ema,
        "epoch": 0,
        "sample": 0,
        "next_task": "train",
    }
    return payload, names, moments, unet


@pytest.mark.parametrize("outer, inner", COMBINATIONS, ids=[f"[{o}]unets.i.[{i}]" for o, i in COMBINATIONS])
def test_a_trainer_checkpoint_keeps_its_moments_and_average_under_any_wrapping(outer, inner):
    """A reference trainer checkpoint converts with every Adam moment attached to its own
    parameter by bare name (no note that the optimizer could not be mapped), the EMA average
    under bare names with its update count, and the weights under `unets.0.<bare name>`: the
    same whether the file was written from one process, under DDP, compiled, or both."""
    payload, names, moments, unet = reference_checkpoint(outer, inner)
    state, notes = convert_checkpoint(payload)
    assert not any("cannot be mapped" in note for note in notes), notes
    trainer = state["trainer"]
    assert sorted(trainer["decoder"]) == sorted(f"unets.0.{name}" for name in unet.state_dict())
    by_name = trainer["optimizers_by_name"]["1"]["state"]
    assert sorted(by_name) == sorted(names)
    assert all(torch.equal(by_name[name]["exp_avg"], moments[name]) for name in names)
    ema = trainer["emas"]["1"]
    assert sorted(ema) == sorted(["num_updates"] + [f"averaged.{name}" for name in unet.state_dict()])
    assert int(ema["num_updates"]) == 7
