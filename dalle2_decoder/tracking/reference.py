"""DALLE2-pytorch (1.15.6) files: recognised, read weights-only and converted to this package's layout.

Two kinds exist:

- a trainer checkpoint (`DecoderTrainer.save`, the tracker's `save_type: checkpoint`):
  `model` (the Decoder's state dict; U-Nets a run froze are missing, the reference replaces them
  by `nn.Identity`), `steps` (optimizer steps per U-Net), `optim{i}` / `sched{i}` (None for
  frozen U-Nets), `ema` (ema-pytorch modules of every U-Net), `version`, and the run's metadata
  (`epoch`, `sample`, `next_task`, `validation_losses`, `samples_seen`, `config`);
- a model save (the tracker's `save_type: model`, as the community's released decoders):
  `model` (EMA weights when EMA was on), `version` (a `packaging.version.Version`) and `config`.
  A bare Decoder state dict is read as a model save too.

Names are mapped by `models.reference_names` (the one place that knows them). Adam moments are
stored in the converted state per parameter name (the reference's optimizer numbers parameters
in its own grouping order), so the trainer can put them in its own order.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

REFERENCE_ORIGIN = "dalle2-pytorch"


def _version_classes() -> List[type]:
    """The classes of a pickled `packaging.version.Version`, and nothing else.

    Version itself; files written with packaging < 26 also pickle its `_Version` record and the
    `Infinity` / `NegativeInfinity` sentinels of its sort key. None of them runs code when built.
    """
    classes: List[type] = []
    try:
        from packaging import version

        classes.append(version.Version)
        if hasattr(version, "_Version"):
            classes.append(version._Version)
        from packaging import _structures

        classes += [
            getattr(_structures, name)
            for name in ("InfinityType", "NegativeInfinityType")
            if hasattr(_structures, name)
        ]
    except ImportError:  # without packaging, such files are refused like any other object
        pass
    return classes


@contextlib.contextmanager
def version_metadata_allowed() -> Iterator[None]:
    """Within the block, weights-only loading also accepts the version object of reference files."""
    with torch.serialization.safe_globals(_version_classes()):
        yield


# --- recognising ---------------------------------------------------------------------------------


def _tensor_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def is_reference_checkpoint(payload: Any) -> bool:
    return (
        isinstance(payload, Mapping)
        and "format" not in payload
        and _tensor_dict(payload.get("model"))
        and "steps" in payload
        and any(key.startswith("optim") for key in payload)
    )


def is_reference_model(payload: Any) -> bool:
    return (
        isinstance(payload, Mapping)
        and "format" not in payload
        and _tensor_dict(payload.get("model"))
        and not is_reference_checkpoint(payload)
    )


# --- names ---------------------------------------------------------------------------------------


def _names():
    from ..models import reference_names

    return reference_names


def decoder_weights(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Our decoder's U-Net weights from a reference Decoder state dict, and one note per kind of entry dropped."""
    names = _names()
    if hasattr(names, "decoder_state_from_reference_with_dropped"):
        mapped, dropped = names.decoder_state_from_reference_with_dropped(state)
    else:
        mapped, dropped = names.decoder_state_from_reference(state), []
    reasons: Dict[str, int] = {}
    for _, reason in dropped:
        reasons[reason] = reasons.get(reason, 0) + 1
    return dict(mapped), [f"{count} entries not loaded: {reason}" for reason, count in reasons.items()]


def unet_weights(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return dict(_names().unet_state_from_reference(state))


def _unet_entries(state: Mapping[str, torch.Tensor], index: int) -> Dict[str, torch.Tensor]:
    """U-Net `index`'s entries by bare name, in the file's order (wrapper prefixes removed: a
    checkpoint written under DDP or torch.compile names them `module.unets.0....`)."""
    prefix = f"unets.{index}."
    mapped = _names().decoder_state_from_reference(state)
    return {name[len(prefix) :]: tensor for name, tensor in mapped.items() if name.startswith(prefix)}


# --- converting ----------------------------------------------------------------------------------


def _optimizer_by_name(model: Mapping[str, torch.Tensor], index: int, saved: Mapping[str, Any]) -> Dict[str, Any]:
    """Adam moments of U-Net `index` keyed by our parameter names.

    The reference built its optimizer from `unet.parameters()` (the U-Net has no buffers, so these
    are its state-dict entries in order), split into a group of tensors with 2 or more dimensions
    and a group of the rest (one group when weight decay was 0).
    """
    entries = _unet_entries(model, index)
    names = list(entries)
    groups = saved["param_groups"]
    counts = [len(group["params"]) for group in groups]
    if sum(counts) != len(names):
        raise ValueError(f"its optimizer has {sum(counts)} parameters, its weights {len(names)} tensors")
    if len(groups) == 2:
        order = [n for n in names if entries[n].ndim >= 2] + [n for n in names if entries[n].ndim < 2]
        if counts[0] != sum(1 for n in names if entries[n].ndim >= 2):
            raise ValueError("its optimizer's parameter groups do not follow the reference's grouping")
    elif len(groups) == 1:
        order = names
    else:
        raise ValueError(f"its optimizer has {len(groups)} parameter groups")
    index_of = [i for group in groups for i in group["params"]]
    states = saved["state"]
    if not states:
        raise ValueError("its optimizer has not taken a step")
    # Parameters that never had a gradient (e.g. a null text embedding without text) have no moments.
    by_ref = {order[position]: states[i] for position, i in enumerate(index_of) if i in states}
    for name, entry in by_ref.items():
        if tuple(entry["exp_avg"].shape) != tuple(entries[name].shape):
            raise ValueError(f"moments of {name} do not have its shape")
    averages = unet_weights({n: e["exp_avg"] for n, e in by_ref.items()})
    squares = unet_weights({n: e["exp_avg_sq"] for n, e in by_ref.items()})
    steps = unet_weights({n: torch.as_tensor(e["step"], dtype=torch.float32).reshape(()) for n, e in by_ref.items()})
    return {
        "state": {
            name: {"step": steps[name], "exp_avg": averages[name], "exp_avg_sq": squares[name]} for name in averages
        }
    }


def _ema(ema: Mapping[str, torch.Tensor], index: int) -> Optional[Dict[str, torch.Tensor]]:
    prefix = f"{index}.ema_model."
    averaged = {name[len(prefix) :]: t for name, t in ema.items() if name.startswith(prefix)}
    if not averaged:
        return None
    initted = bool(ema.get(f"{index}.initted", torch.tensor(True)))
    count = int(ema.get(f"{index}.step", torch.tensor(0))) if initted else 0
    state = {f"averaged.{name}": tensor for name, tensor in unet_weights(averaged).items()}
    state["num_updates"] = torch.tensor(count, dtype=torch.long)
    return state


def convert_checkpoint(payload: Mapping[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """Our checkpoint state (`trainer`, `reference`) from a reference trainer checkpoint, and notes."""
    model = payload["model"]
    weights, notes = decoder_weights(model)
    steps = [int(s) for s in torch.as_tensor(payload["steps"]).reshape(-1).tolist()]
    trainer: Dict[str, Any] = {
        "decoder": weights,
        "partial_decoder": True,
        "optimizers_by_name": {},
        "scheduler_steps": {},
        "emas": {},
        "trained_unets": [],
    }
    for index, step in enumerate(steps):
        number = str(index + 1)
        optimizer = payload.get(f"optim{index}")
        if optimizer is None:
            continue
        trainer["trained_unets"].append(index + 1)
        try:
            trainer["optimizers_by_name"][number] = _optimizer_by_name(model, index, optimizer)
        except (ValueError, KeyError) as error:
            notes.append(
                f"U-Net {number}: the optimizer state of the DALLE2-pytorch checkpoint cannot be mapped ({error})"
            )
        scheduler = payload.get(f"sched{index}") or {}
        trainer["scheduler_steps"][number] = int(scheduler.get("last_epoch", step))
        ema = _ema(payload.get("ema") or {}, index)
        if ema is not None:
            trainer["emas"][number] = ema
    trained_steps = [steps[n - 1] for n in trainer["trained_unets"]] or [0]
    if len(set(trained_steps)) > 1:
        notes.append(
            f"the U-Nets took different numbers of steps ({trained_steps}); the run continues counting from "
            f"{max(trained_steps)}"
        )
    trainer["counters"] = {"step": max(trained_steps), "micro_step": max(trained_steps)}
    losses = payload.get("validation_losses") or []
    reference = {
        "version": str(payload.get("version", "")),
        "epoch": int(payload.get("epoch", 0)),
        "sample": int(payload.get("sample", 0)),
        "next_task": str(payload.get("next_task", "train")),
        "samples_seen": int(payload.get("samples_seen", 0)),
        "validation_losses": [float(v) for v in losses],
        "num_trained_unets": len(trainer["trained_unets"]),
        "config": payload.get("config") if isinstance(payload.get("config"), Mapping) else None,
    }
    return {"trainer": trainer, "reference": reference}, notes


def convert_model(payload: Mapping[str, Any]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Our decoder weights from a reference model save (or a bare reference Decoder state dict), and notes."""
    state = payload["model"] if "model" in payload else payload
    return decoder_weights(state)


def config_json(payload: Mapping[str, Any]) -> Optional[str]:
    """The run config a reference file records (its `config` metadata), as JSON."""
    config = payload.get("config") if isinstance(payload, Mapping) else None
    return json.dumps(config, default=str) if isinstance(config, Mapping) else None


def reference_step(payload: Mapping[str, Any]) -> int:
    steps = payload.get("steps")
    return int(torch.as_tensor(steps).max()) if steps is not None else 0


def schedule_note(beta_schedules: Sequence[str]) -> Optional[str]:
    """A note when a DALLE2-pytorch checkpoint meets a cascade whose every U-Net has the cosine schedule.

    The reference's code gives the last U-Net of a cascade a linear schedule when its config leaves
    `beta_schedule` out, while the configuration reference documents cosine (our default): a
    checkpoint trained that way samples wrongly under all-cosine, and neither file can tell.
    """
    if len(beta_schedules) > 1 and all(schedule == "cosine" for schedule in beta_schedules):
        return (
            "decoder.beta_schedule is cosine for every U-Net; if this DALLE2-pytorch checkpoint was trained with "
            'beta_schedule left out, its last U-Net used a linear schedule: set "beta_schedule": null (the '
            "reference's rule) or list the schedules (docs/MIGRATING.md)"
        )
    return None
