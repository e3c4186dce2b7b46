"""DALLE2-pytorch (1.15.6) files: recognised, read weights-only and converted to this package's layout.

Two kinds exist:

- a trainer checkpoint (`DecoderTrainer.save`, the tracker's `save_type: checkpoint`):
  `model` (the Decoder's state dict; U-Nets a run froze are missing, the reference replaces them
  by `nn.Identity`), `steps` (optimizer steps per U-Net), `optim{i}` / `sched{i}` (None for
  frozen U-Nets), `ema` (ema-pytorch modules of every U-Net), `version`, and the run's metadata
  (`epoch`, `sample`, `next_task`, `validation_losses`, `samples_seen`, `config`); before 0.16 one
  `step` counted the updates of all U-Nets together, and there were no schedulers;
- a model save (the tracker's `save_type: model`, as the community's released decoders):
  `model` (EMA weights when EMA was on), `version` (a `packaging.version.Version`) and `config`.
  A bare Decoder state dict is read as a model save too.

Names are mapped by `models.reference_names` (the one place that knows them). Files of releases
before 1.15.6 are read too: the release a file records (`version`) selects the U-Net of that
release (`models.releases`), in the config recorded with it (`config_for_release`) or, for a
decoder the caller built, by checking that its U-Nets were built for it (`release_mismatch`). Adam moments are
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
        and ("steps" in payload or "step" in payload)  # `step`: one counter for all U-Nets, before 0.16
        and any(key.startswith("optim") for key in payload)
    )


def _steps(payload: Mapping[str, Any]) -> List[int]:
    """Optimizer steps per U-Net; before 0.16 the one `step` (all U-Nets' updates together) for each."""
    if payload.get("steps") is not None:
        return [int(s) for s in torch.as_tensor(payload["steps"]).reshape(-1).tolist()]
    count = sum(1 for key in payload if key.startswith("optim") and key[len("optim") :].isdigit())
    return [int(float(payload.get("step", 0)))] * max(count, 1)


def is_reference_model(payload: Any) -> bool:
    return (
        isinstance(payload, Mapping)
        and "format" not in payload
        and _tensor_dict(payload.get("model"))
        and not is_reference_checkpoint(payload)
    )


# --- releases ------------------------------------------------------------------------------------


def release_of(payload: Any) -> Optional[str]:
    """The DALLE2-pytorch release a file records (`version`: a string, or a `packaging` Version), or None.

    Raises `releases.UnsupportedReleaseError` (one line naming the release) for a release this
    package does not read. Model saves written before 1.0 are bare state dicts and record none.
    """
    from ..models.releases import check_supported, release_text

    version = payload.get("version") if isinstance(payload, Mapping) else None
    if version is None or str(version) == "":
        return None
    return release_text(check_supported(version))


def release_differs(release: Optional[str]) -> bool:
    """Whether that release's U-Net differs from 1.15.6's (and so from this package's default)."""
    from ..models.releases import describe

    return bool(describe(release))


def config_for_release(raw: Mapping[str, Any], release: Optional[str]) -> Dict[str, Any]:
    """A recorded config with `reference_release` set on each U-Net that does not name one, when `release` differs."""
    out = json.loads(json.dumps(raw))
    decoder = out.get("decoder") if isinstance(out, dict) else None
    if release_differs(release) and isinstance(decoder, dict) and isinstance(decoder.get("unets"), list):
        for unet in decoder["unets"]:
            if isinstance(unet, dict) and unet.get("reference_release") is None:
                unet["reference_release"] = release
    return out


def _without_unset(value: Any) -> Any:
    """A DALLE2-pytorch config dump without its None entries (pydantic writes every unset option as None)."""
    if isinstance(value, dict):
        return {key: _without_unset(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_unset(item) for item in value]
    return value


def recorded_config(loaded: Any) -> Optional[Dict[str, Any]]:
    """The run config a loaded file records, ready for `TrainDecoderConfig` (None if it records none).

    A DALLE2-pytorch config loses its unset (None) options, and its U-Nets are built as the release
    that wrote the file built them."""
    if not loaded.config_json:
        return None
    raw = json.loads(loaded.config_json)
    if loaded.origin != REFERENCE_ORIGIN or not isinstance(raw, dict):
        return raw
    return config_for_release(_without_unset(raw), loaded.reference_release)


def release_mismatch(unets: Sequence[Any], release: Optional[str], source: str) -> Optional[str]:
    """A one-line problem when U-Nets built for one release are given weights written by another that differs.

    `unets` are the decoder's U-Nets (their `reference_release` says which release they were built
    for); None when they fit, or when the file records no release.
    """
    from ..models.releases import describe

    if release is None:
        return None
    wanted = describe(release)
    for number, unet in enumerate(unets, start=1):
        built = getattr(unet, "reference_release", None)
        if describe(built) != wanted:
            what = "; ".join(wanted) if wanted else "the U-Net of 1.15.6 (this package's)"
            return (
                f"{source} was written by DALLE2-pytorch {release}, whose U-Nets differ from U-Net {number} as "
                f'built here ({what}): build it with "reference_release": "{release}" in '
                f"decoder.unets[{number - 1}] (docs/MIGRATING.md)"
                if wanted
                else f"{source} was written by DALLE2-pytorch {release} (1.15.6's U-Net), but U-Net {number} is "
                f"built as release {built}'s: remove its reference_release (docs/MIGRATING.md)"
            )
    return None


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
    # Before 0.16 the U-Net had buffers (LayerNorm shifts), which its optimizer did not hold.
    unet = _unet_entries(model, index)
    entries = {name: t for name, t in unet.items() if not _names().old_layer_norm_shift(name, unet)}
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
    steps = _steps(payload)
    if payload.get("steps") is None and len(steps) > 1:
        notes.append(
            f"DALLE2-pytorch before 0.16 counts one step for all U-Nets together ({steps[0]}); each U-Net continues "
            "from it"
        )
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
    trainer["reference_release"] = release_of(payload)
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
    return max(_steps(payload)) if is_reference_checkpoint(payload) else 0


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
