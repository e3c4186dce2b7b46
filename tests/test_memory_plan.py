"""The memory plan's arithmetic (dalle2_decoder.training.memory_plan) and what `--check` prints of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref

import pytest
import torch

from dalle2_decoder import TrainDecoderConfig
from dalle2_decoder.training.memory_plan import (
    UnetShape,
    activation_bytes,
    gib,
    memory_plan_lines,
    unet_memory,
    unet_shapes,
)

from .conftest import REPO_ROOT
from .training_fixtures import tiny_config, write_tiny_demo

SHAPE = UnetShape(number=1, parameters=1000, largest_blocks=(300, 200), activations=5000, trained=True)


def test_ddp_holds_everything_and_grads_twice():
    memory = unet_memory(SHAPE, sharded=False, processes=4)
    # weights 4P, gradients 4P + 4P (DDP's buckets), AdamW's two moments 8P, EMA 4P, activations as measured
    assert (memory.weights, memory.gradients, memory.optimizer, memory.ema, memory.activations) == (
        4000,
        8000,
        8000,
        4000,
        5000,
    )
    assert memory.total == 29000
    # under autocast, a 16-bit copy of each weight is saved for the backward pass; activations in 16 bits
    bf16 = unet_memory(SHAPE, sharded=False, processes=4, precision="bf16")
    assert (bf16.weights, bf16.activations) == (4000 + 2000, 2500)
    assert unet_memory(SHAPE, sharded=False, processes=4, use_ema=False).ema == 0


def test_fsdp_splits_the_state_and_adds_its_working_set():
    memory = unet_memory(SHAPE, sharded=True, processes=4)
    # P / 4 = 250 parameters each; two largest blocks gathered (fp32), the largest block's whole gradients
    assert memory.weights == 4 * 250 + 4 * (300 + 200)
    assert memory.gradients == 4 * 250 + 4 * 300
    assert memory.optimizer == 8 * 250 and memory.ema == 4 * 250 and memory.activations == 5000
    # bf16: gathered weights in 16 bits, activations halved; master weights, moments, EMA stay fp32
    bf16 = unet_memory(SHAPE, sharded=True, processes=4, precision="bf16")
    assert bf16.weights == 4 * 250 + 2 * (300 + 200) and bf16.activations == 2500 and bf16.optimizer == 2000
    # HYBRID_SHARD: 2 replicas of 2 shards: each U-Net split in 2, not 4
    assert unet_memory(SHAPE, sharded=True, processes=4, replicas=2).optimizer == 8 * 500
    # one process: nothing to gather, the whole state
    assert unet_memory(SHAPE, sharded=True, processes=1).weights == 4000


def test_sampling_phases_hold_the_whole_unet_gathered_under_fsdp_and_no_gradients():
    # FSDP over 4: master shard 4 * 250, moments 8 * 250, EMA 4 * 250, the whole U-Net gathered in fp32
    assert unet_memory(SHAPE, sharded=True, processes=4).sampling == 4 * 250 + 8 * 250 + 4 * 250 + 4 * 1000
    # gathered in 16 bits under bf16; without EMA there is no EMA shard
    assert unet_memory(SHAPE, sharded=True, processes=4, precision="bf16").sampling == 16 * 250 + 2 * 1000
    assert unet_memory(SHAPE, sharded=True, processes=4, use_ema=False).sampling == 12 * 250 + 4 * 1000
    # one process: nothing is gathered, the whole state is there already
    assert unet_memory(SHAPE, sharded=True, processes=1).sampling == 16 * 1000
    # DDP: weights, its gradient buckets, moments, EMA; no activations, so never above its training peak
    ddp = unet_memory(SHAPE, sharded=False, processes=4)
    assert ddp.sampling == 4000 + 4000 + 8000 + 4000 and ddp.sampling < ddp.total
    assert unet_memory(attrs_evolve(SHAPE, trained=False), sharded=True, processes=4).sampling == 4000


def test_the_verdict_takes_the_sampling_peak_when_it_is_the_larger(tiny):
    """Many processes: the shards shrink, the gathered copy does not (a wider U-Net than the tests'
    tiny one, whose activations outweigh its weights, and a batch of 1)."""
    _, raw = tiny
    raw = json.loads(json.dumps(raw))
    raw["decoder"]["unets"][0]["dim"] = 128
    raw["data"]["batch_size"] = 1
    config = TrainDecoderConfig.from_dict(raw)
    (shape,) = unet_shapes(config)
    memory = unet_memory(shape, sharded=True, processes=64)
    assert memory.sampling > memory.total
    lines = memory_plan_lines(config, processes=64, available=((memory.total + memory.sampling) // 2, "test device"))
    assert any(line.startswith("  warning: FSDP:") and "does not fit" in line for line in lines), lines
    assert any("sample grids, validation, evaluation: each trained U-Net gathered whole" in line for line in lines)
    lines = memory_plan_lines(config, processes=64, available=(memory.sampling, "test device"))
    assert any(line.startswith("  FSDP:") and "fits in" in line for line in lines), lines


def test_frozen_unets_are_whole_weights_only():
    frozen = unet_memory(attrs_evolve(SHAPE, trained=False), sharded=True, processes=4)
    assert (frozen.weights, frozen.total) == (4000, 4000)


def attrs_evolve(shape, **changes):
    import attrs

    return attrs.evolve(shape, **changes)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan")
    raw = tiny_config(write_tiny_demo(folder / "demo"), folder / "run")
    return TrainDecoderConfig.from_dict(raw), raw


def test_shapes_count_the_unet_and_its_blocks(tiny):
    config, _ = tiny
    (shape,) = unet_shapes(config)
    real = config.decoder.create().unets[0]  # as the Decoder builds it
    assert shape.parameters == sum(p.numel() for p in real.parameters())
    assert shape.largest_blocks[0] >= shape.largest_blocks[1] > 0
    assert shape.activations > 0


def test_activation_estimate_is_what_autograd_saves(tiny):
    """On the meta device as on the CPU: the same saved tensors, for a real batch."""
    config, _ = tiny
    unet = config.decoder.unets[0].create()
    held = held_saved_bytes(
        lambda: unet(torch.rand(4, 3, 16, 16), torch.zeros(4, dtype=torch.long), image_embed=torch.rand(4, 32)),
        unet.parameters(),
    )
    with torch.device("meta"):
        meta_unet = config.decoder.unets[0].create()
    estimate = activation_bytes(meta_unet, batch_size=4, image_size=16, image_embed_dim=32, lowres=False)
    print(f"activations: estimate {estimate}, held {held}")
    # shapes are the same on both devices; the meta count tells tensors apart by identity, the CPU's
    # by storage (a view and its base are one there): 15% covers the views autograd saves
    assert 0.85 * held <= estimate <= 1.15 * held
    # linear in the batch
    double = activation_bytes(meta_unet, batch_size=8, image_size=16, image_embed_dim=32, lowres=False)
    assert 1.9 * estimate <= double <= 2.1 * estimate


def test_the_plan_warns_when_a_mode_does_not_fit(tiny):
    config, _ = tiny
    ddp = sum(unet_memory(s, sharded=False, processes=2).total for s in unet_shapes(config))
    fsdp = sum(unet_memory(s, sharded=True, processes=2).total for s in unet_shapes(config))
    assert fsdp < ddp
    lines = memory_plan_lines(config, processes=2, available=((ddp + fsdp) // 2, "test device"))
    assert any(line.startswith("  warning: DDP:") and "does not fit" in line for line in lines)
    assert any(line.startswith("  FSDP:") and "fits in" in line for line in lines)
    assert sum("U-Net 1" in line for line in lines) == 2


def test_check_prints_the_plan_on_stderr(tiny, tmp_path):
    import json

    _, raw = tiny
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train_decoder.py"), "--config_file", str(path), "--check"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)  # stdout stays the resolved config
    assert "memory plan per process (1 process(es), batch 4 per process" in result.stderr
    assert "DDP  U-Net 1" in result.stderr and "FSDP U-Net 1" in result.stderr


def test_check_plans_the_launchers_activation_checkpointing(tiny, tmp_path):
    """Under `accelerate launch` with an FSDP config asking for activation checkpointing (the
    environment accelerate passes to each process), `--check` plans checkpointed activations."""
    config, raw = tiny
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    launcher = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train_decoder.py"), "--config_file", str(path), "--check"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, **launcher},
    )
    assert result.returncode == 0, result.stderr
    (checkpointed,) = unet_shapes(config, activation_checkpointing=True)
    (plain,) = unet_shapes(config)
    fsdp = [line for line in result.stderr.splitlines() if line.startswith("  FSDP U-Net 1")]
    assert (
        len(fsdp) == 1
        and f"activations {gib(unet_memory(checkpointed, sharded=True, processes=1).activations)}" in fsdp[0]
    )
    assert f"activations {gib(plain.activations)}" not in fsdp[0]


def held_saved_bytes(run, parameters=()) -> int:
    """Bytes of the distinct storages autograd saves in `run()` and still holds with its output
    alive, but the storages of `parameters` (the weights, which the plan counts as such)."""
    refs = []
    weights = {parameter.untyped_storage().data_ptr() for parameter in parameters}

    def pack(tensor):
        refs.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run()  # noqa: F841 (held: its graph keeps what the backward pass needs)
        storages = {}
        for tensor in (ref() for ref in refs):
            if tensor is not None:
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(size for pointer, size in storages.items() if pointer not in weights)


def test_activation_checkpointing_keeps_block_inputs_and_one_recomputed_block(tiny):
    """With `checkpoint_during_training`, a real CPU forward pass holds the layers' saved tensors
    outside the blocks and each checkpointed block's inputs; the backward pass then recomputes one
    block at a time, holding that block's saved tensors: the estimate is the sum of those."""
    from dalle2_decoder.models.layers import ResnetBlock

    config, _ = tiny
    unet_config = attrs_evolve(
        config.decoder.unets[0], options={**config.decoder.unets[0].options, "checkpoint_during_training": True}
    )
    unet = unet_config.create().train()
    inputs = {}
    checkpointed = [m for m in unet.modules() if isinstance(m, ResnetBlock)] + [unet.mid_attn]
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.setdefault(m, args)) for m in checkpointed]

    def forward():
        return unet(torch.rand(4, 3, 16, 16), torch.zeros(4, dtype=torch.long), image_embed=torch.rand(4, 32))

    forward_held = held_saved_bytes(forward, unet.parameters())
    for hook in hooks:
        hook.remove()
    assert set(inputs) == set(checkpointed)
    largest_block = max(held_saved_bytes(lambda m=m, a=a: m(*a), unet.parameters()) for m, a in inputs.items())

    with torch.device("meta"):
        meta_unet = unet_config.create()
    estimate = activation_bytes(meta_unet, batch_size=4, image_size=16, image_embed_dim=32, lowres=False)
    print(f"checkpointed activations: estimate {estimate}, held {forward_held} + largest block {largest_block}")
    # as above: identities on the meta device, storages on the CPU
    assert 0.85 * (forward_held + largest_block) <= estimate <= 1.15 * (forward_held + largest_block)
    plain = activation_bytes(
        config.decoder.unets[0].create().to("meta"), batch_size=4, image_size=16, image_embed_dim=32, lowres=False
    )
    assert estimate < plain


def test_the_plan_follows_checkpoint_during_training_and_the_launchers_checkpointing(tiny):
    config, raw = tiny
    (plain,) = unet_shapes(config)
    raw = json.loads(json.dumps(raw))
    raw["decoder"]["unets"][0]["checkpoint_during_training"] = True
    (checkpointed,) = unet_shapes(TrainDecoderConfig.from_dict(raw))
    (launcher,) = unet_shapes(config, activation_checkpointing=True)
    assert checkpointed.activations == launcher.activations < plain.activations
    assert checkpointed.parameters == plain.parameters
    lines = memory_plan_lines(config, processes=2, activation_checkpointing=True)
    planned = unet_memory(launcher, sharded=True, processes=2)
    expected = f"activations {gib(planned.activations)}"
    assert any(line.startswith("  FSDP U-Net 1") and expected in line for line in lines)
