"""Checkpoint and model files: atomic writes, weights-only reads, strict loading into a model.

Two kinds of file are written:

- a *checkpoint* (`.pt`), everything needed to resume: `{"format", "step", "config", "state"}` where
  `state` is the trainer's `checkpoint_state` (state dicts, counters, RNG states as tensors);
- a *model* save, the weights alone (EMA weights when EMA is on): `.safetensors` with the config
  JSON and step in its metadata, or `.pt` holding `{"format", "step", "config", "model"}`.

Everything in a `.pt` file is restricted to what `torch.load(weights_only=True)` accepts (tensors,
dicts, lists, tuples, str, int, float, bool, None), and this is checked before writing, so a file
this package wrote can always be read back without unpickling arbitrary objects.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..common.files import atomic_write
from ..failures import EXIT_CHECKPOINT
from .rng import capture_rng_state as capture_rng_state  # the states a checkpoint stores
from .rng import restore_rng_state as restore_rng_state

CHECKPOINT_FORMAT = "dalle2_decoder.checkpoint/1"
MODEL_FORMAT = "dalle2_decoder.model/1"

PathLike = Union[str, "os.PathLike[str]"]

_PLAIN_TYPES = (str, int, float, bool, type(None))


class CheckpointError(RuntimeError):
    """A checkpoint or model file cannot be written, read or used."""

    exit_status: ClassVar[int] = EXIT_CHECKPOINT


class CheckpointMismatchError(CheckpointError):
    """Weights that do not fit the model; lists every missing, unexpected and mis-shaped tensor."""

    def __init__(self, source: str, missing: List[str], unexpected: List[str], mismatched: List[str]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"{source} does not fit the configured model:"]
        for title, names in (
            ("shape mismatch (checkpoint vs model)", mismatched),
            ("missing from the checkpoint", missing),
            ("in the checkpoint but not in the model", unexpected),
        ):
            if names:
                shown = names[:20] + ([f"... and {len(names) - 20} more"] if len(names) > 20 else [])
                lines.append(f"  {title} ({len(names)}): " + ", ".join(shown))
        everything = missing + unexpected + mismatched
        if len(everything) > 20:  # the names shown are cut: say which parts of the model differ
            counts: Dict[str, int] = {}
            for name in everything:
                prefix = ".".join(name.split(" ")[0].split(".")[:2])
                counts[prefix] = counts.get(prefix, 0) + 1
            lines.append("  by module: " + ", ".join(f"{prefix} ({count})" for prefix, count in counts.items()))
        lines.append("  Check that the decoder section of the config matches the one the file was saved with.")
        super().__init__("\n".join(lines))


# --- writing ---------------------------------------------------------------------------------


def check_weights_only(value: Any, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first entry that `torch.load(weights_only=True)` would refuse."""
    if isinstance(value, torch.Tensor) or isinstance(value, _PLAIN_TYPES):
        return
    if isinstance(value, (torch.dtype, torch.device, torch.Size)):
        return
    if isinstance(value, dict):  # OrderedDict (state dicts) included
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key of type {type(key).__name__} ({key!r}); use str or int keys")
            check_weights_only(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_weights_only(item, f"{where}[{index}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which weights-only loading refuses; "
        "store tensors, numbers, strings, lists or dicts instead (e.g. RNG states as tensors, see capture_rng_state)"
    )


def _plain_dict(value: Mapping) -> dict:
    """Turn OrderedDicts and other mappings (state dicts) into plain dicts, recursively."""
    if isinstance(value, Mapping):
        return {key: _plain_dict(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_dict(item) for item in value]
    return value


def save_checkpoint(path: PathLike, state: Mapping[str, Any], *, step: int, config_json: Optional[str] = None) -> Path:
    """Atomically write a resumable checkpoint holding the trainer's `state`."""
    payload = {"format": CHECKPOINT_FORMAT, "step": int(step), "config": config_json, "state": _plain_dict(state)}
    check_weights_only(payload["state"], "checkpoint_state")
    return atomic_write(path, lambda temp: torch.save(payload, temp))


def _tensors_for_file(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing storage are copied (safetensors refuses aliases)."""
    tensors: Dict[str, torch.Tensor] = {}
    seen: set = set()
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"model_state[{name!r}] is a {type(tensor).__name__}; a model save holds tensors only")
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel():
            if tensor.untyped_storage().data_ptr() in seen:
                tensor = tensor.clone()
            seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    return tensors


def save_model(
    path: PathLike, model_state: Mapping[str, torch.Tensor], *, step: int, config_json: Optional[str] = None
) -> Path:
    """Atomically write a model save: safetensors when `path` ends in `.safetensors`, else a weights-only `.pt`."""
    tensors = _tensors_for_file(model_state)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        metadata = {"format": MODEL_FORMAT, "step": str(int(step))}
        if config_json is not None:
            metadata["config"] = config_json
        return atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=metadata))
    payload = {"format": MODEL_FORMAT, "step": int(step), "config": config_json, "model": tensors}
    return atomic_write(path, lambda temp: torch.save(payload, temp))


# --- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedCheckpoint:
    """The content of a checkpoint or model file (what `Tracker.load()` returns)."""

    kind: str
    """`checkpoint` (resumable: `state` is set) or `model` (weights only: `model_state` is set)."""
    step: int
    """Step recorded when the file was saved (0 when the file does not say)."""
    config_json: Optional[str]
    """The (secret-free) config the file was saved with, as JSON, when recorded (DALLE2-pytorch's format
    and option names when `origin` is `dalle2-pytorch`)."""
    state: Optional[Dict[str, Any]] = None
    """The trainer's `checkpoint_state`, for a checkpoint."""
    model_state: Optional[Dict[str, torch.Tensor]] = None
    """The weights, for a model save."""
    source: str = ""
    """Where the file came from (path, URL, wandb run file), for messages."""
    auto_resumed: bool = False
    """True when this is the latest checkpoint of an interrupted run being auto-resumed."""
    origin: str = "dalle2_decoder"
    """Which package wrote the file: `dalle2_decoder`, or `dalle2-pytorch` (converted on reading)."""
    partial: bool = False
    """The weights may cover only some U-Nets (DALLE2-pytorch leaves out the U-Nets a run froze)."""
    notes: Tuple[str, ...] = ()
    """What was left out or could not be mapped while reading (DALLE2-pytorch files)."""
    reference_release: Optional[str] = None
    """The DALLE2-pytorch release that wrote the file, where it records one (None for this package's files)."""
    sharded_path: Optional[str] = None
    """A sharded checkpoint (`tracking.sharded`): the folder whose shard files hold the tensors that
    `state` leaves out (the link it was named by, resolved). None for a checkpoint file."""


class CheckpointFormatError(CheckpointError):
    """A file that is not (or no longer) a checkpoint or model save this package can read."""


def _torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)`, also accepting the version object DALLE2-pytorch stores, and nothing more."""
    from .reference import version_metadata_allowed

    try:
        with version_metadata_allowed():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message: a generic first line, then the actual reason, then boilerplate
        reasons = [
            line.strip()
            for line in str(error).splitlines()[1:]
            if line.strip() and not line.strip().startswith(("Please file an issue", "Check the documentation"))
        ]
        if not reasons or reasons[0].startswith(("Unsupported operand", "invalid load key")):
            # not a pickle at all: no valid first opcode
            detail = reasons[0] if reasons else (str(error).strip().splitlines() or ["unreadable"])[0]
            raise CheckpointFormatError(f"{path}: not a PyTorch checkpoint file ({detail})") from error
        raise CheckpointFormatError(
            f"{path} could not be loaded with weights-only loading ({reasons[0]}): it is not a checkpoint, or it "
            "holds objects other than tensors and plain containers, which are not unpickled because that "
            "could run arbitrary code"
        ) from error
    except EOFError as error:
        raise CheckpointFormatError(
            f"{path}: the file ends before its content does (truncated or still being written)"
        ) from error
    except (KeyError, ValueError, IndexError, UnicodeDecodeError) as error:
        # torch's legacy reader on bytes that are no pickle: e.g. KeyError(101) for text
        raise CheckpointFormatError(
            f"{path}: not a PyTorch checkpoint file (.pth/.pt) nor a safetensors file"
        ) from error
    except (RuntimeError, OSError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointFormatError(f"{path} is not a readable checkpoint or model file ({detail})") from error


def _check_path(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder, not a checkpoint file nor a sharded checkpoint folder (no checkpoint.pt and "
            f"shard files in it); name the file in it (e.g. {path}/latest.pth)"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointFormatError(f"{path}: the file is empty (0 bytes); it was never written completely")


def _ours(payload: Mapping[str, Any], path: Path) -> LoadedCheckpoint:
    """A file of this package, its required entries checked (a damaged file is named, not a KeyError)."""
    tag = payload.get("format")
    if tag == CHECKPOINT_FORMAT:
        state = payload.get("state")
        if not isinstance(state, Mapping):
            raise CheckpointFormatError(
                f"{path}: a dalle2_decoder checkpoint without its 'state' entry; the file is damaged or was edited"
            )
        return LoadedCheckpoint(
            "checkpoint", int(payload.get("step", 0)), payload.get("config"), state=dict(state), source=str(path)
        )
    if tag == MODEL_FORMAT:
        model = payload.get("model")
        if not _tensor_mapping(model):
            raise CheckpointFormatError(
                f"{path}: a dalle2_decoder model save without its 'model' weights; the file is damaged or was edited"
            )
        return LoadedCheckpoint(
            "model", int(payload.get("step", 0)), payload.get("config"), model_state=dict(model), source=str(path)
        )
    known = f"{CHECKPOINT_FORMAT} or {MODEL_FORMAT}"
    raise CheckpointFormatError(
        f"{path}: format {tag!r} is not one this version reads ({known}); "
        "it was written by another version of dalle2_decoder"
    )


def _tensor_mapping(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def read_file(path: PathLike) -> LoadedCheckpoint:
    """Read a checkpoint or model file of this package or of DALLE2-pytorch (or a plain state dict of tensors).

    Raises CheckpointError (CheckpointFormatError for a file that is not a usable checkpoint) with
    one line naming the file and what is wrong with it.
    """
    from .sharded import is_sharded_folder

    path = Path(path)
    if is_sharded_folder(path):
        return _read_sharded(path)
    _check_path(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    payload = _torch_load(path)
    if isinstance(payload, Mapping) and "format" in payload:
        return _ours(payload, path)
    loaded = _reference_file(payload, path)
    if loaded is not None:
        return loaded
    if _tensor_mapping(payload):
        return LoadedCheckpoint("model", 0, None, model_state=dict(payload), source=str(path))
    if isinstance(payload, Mapping) and not payload:
        raise CheckpointFormatError(f"{path}: holds an empty dictionary, no weights")
    what = (
        f"a dictionary with entries {sorted(map(str, payload))[:8]}"
        if isinstance(payload, Mapping)
        else f"a {type(payload).__name__}"
    )
    raise CheckpointFormatError(
        f"{path}: {what}; neither a checkpoint or model save of dalle2_decoder or DALLE2-pytorch, "
        "nor a plain state dict of tensors"
    )


def _read_safetensors(path: Path) -> LoadedCheckpoint:
    """A model save in safetensors, its step and config from the metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointFormatError(f"{path} is not a readable safetensors file ({error})") from error
    return LoadedCheckpoint(
        "model", int(metadata.get("step", 0)), metadata.get("config"), model_state=tensors, source=str(path)
    )


def _reference_file(payload: Any, path: Path) -> Optional[LoadedCheckpoint]:
    """A DALLE2-pytorch checkpoint or model save, converted; None for a payload that is neither."""
    from . import reference

    try:
        release = reference.release_of(payload)
    except ValueError as error:  # a release this package does not read
        raise CheckpointFormatError(f"{path}: {error}") from error
    # Its files leave out the U-Nets a run froze: the weights may cover only some.
    converted = dict(source=str(path), origin=reference.REFERENCE_ORIGIN, partial=True, reference_release=release)
    try:
        if reference.is_reference_checkpoint(payload):
            state, notes = reference.convert_checkpoint(payload)
            step, kind, contents = reference.reference_step(payload), "checkpoint", dict(state=state)
        elif reference.is_reference_model(payload) or (
            _tensor_mapping(payload) and any(k.startswith("unets.") for k in payload)
        ):
            weights, notes = reference.convert_model(payload)
            step, kind, contents = 0, "model", dict(model_state=weights)
            if release is None:
                notes.append(
                    "it records no DALLE2-pytorch release (model saves before 1.0 do not): its U-Nets are taken as "
                    "the config builds them; for a file of releases 0.15.4 to 0.26, set "
                    "decoder.unets[i].reference_release to the release it was trained with (docs/MIGRATING.md)"
                )
        else:
            return None
    except ValueError as error:  # the name mapping found an entry it does not know
        raise CheckpointFormatError(
            f"{path}: a DALLE2-pytorch file whose weights cannot be mapped ({error})"
        ) from error
    return LoadedCheckpoint(kind, step, reference.config_json(payload), **contents, **converted, notes=tuple(notes))


def _read_sharded(path: Path) -> LoadedCheckpoint:
    """A sharded checkpoint folder: its `checkpoint.pt`, checked, with the folder to read the shards from."""
    from .sharded import SHARDED_FORMAT, STATE_FILE, check_folder

    loaded = _ours(_torch_load(path / STATE_FILE), path / STATE_FILE)
    sharded = ((loaded.state or {}).get("trainer") or {}).get("sharded") if loaded.kind == "checkpoint" else None
    if not isinstance(sharded, Mapping) or sharded.get("format") != SHARDED_FORMAT:
        raise CheckpointFormatError(
            f"{path}: a folder with {STATE_FILE} and shard files, but {STATE_FILE} is not a sharded checkpoint's "
            f"(format {SHARDED_FORMAT}); the folder was assembled by hand or by another version"
        )
    folder = path.resolve()
    check_folder(folder, sharded.get("files"))
    return dataclasses.replace(loaded, source=str(path), sharded_path=str(folder))


def is_sharded(loaded: LoadedCheckpoint) -> bool:
    return loaded.sharded_path is not None


def whole(loaded: LoadedCheckpoint, *, optimizers: bool = True) -> LoadedCheckpoint:
    """A sharded checkpoint read whole into this process (the layout of a checkpoint file); others as they are.

    Without `optimizers`, the optimizer moments are left out (weights and EMAs only, for sampling).
    """
    if loaded.sharded_path is None:
        return loaded
    from .sharded import whole_trainer_state

    state = dict(loaded.state or {})
    state["trainer"] = whole_trainer_state(Path(loaded.sharded_path), state["trainer"], optimizers=optimizers)
    return dataclasses.replace(loaded, state=state, sharded_path=None)


def trainer_state(state: Optional[Mapping[str, Any]], source: str) -> Dict[str, Any]:
    """The trainer state of a loaded checkpoint, checked: CheckpointFormatError naming the file when damaged.

    A sharded checkpoint's trainer state holds no tensors (they are in its shard files, see `whole`)."""
    trainer = (state or {}).get("trainer")
    if isinstance(trainer, Mapping) and isinstance(trainer.get("sharded"), Mapping):
        return dict(trainer)
    if not isinstance(trainer, Mapping) or not isinstance(trainer.get("decoder"), Mapping):
        raise CheckpointFormatError(
            f"{source}: a checkpoint without its trainer state ('state' -> 'trainer' -> 'decoder'); "
            "the file is damaged or was edited"
        )
    emas = trainer.get("emas", {})
    if not isinstance(emas, Mapping) or not all(isinstance(ema, Mapping) for ema in emas.values()):
        raise CheckpointFormatError(
            f"{source}: a checkpoint whose EMA states ('state' -> 'trainer' -> 'emas') are not one mapping per "
            "U-Net; the file is damaged or was edited"
        )
    return dict(trainer)


def checkpoint_weights(loaded: LoadedCheckpoint, *, use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The decoder weights of a checkpoint: each U-Net's EMA average where it has one (and `use_ema`),
    its trained weights otherwise. Raises CheckpointFormatError naming the file when they are missing.
    A sharded checkpoint is read whole (its optimizer moments left out)."""
    loaded = whole(loaded, optimizers=False)
    trainer = trainer_state(loaded.state, loaded.source)
    weights = dict(trainer["decoder"])
    if use_ema:
        for key, ema in trainer.get("emas", {}).items():
            prefix = f"unets.{int(key) - 1}."
            averaged = {name[len("averaged.") :]: t for name, t in ema.items() if name.startswith("averaged.")}
            weights.update({prefix + name: tensor for name, tensor in averaged.items()})
    return weights


def has_ema_weights(loaded: LoadedCheckpoint) -> bool:
    """Whether the checkpoint holds an EMA average of some U-Net (what `use_ema` then takes)."""
    trainer = trainer_state(loaded.state, loaded.source)
    if isinstance(trainer.get("sharded"), Mapping):
        return bool(trainer["sharded"].get("emas"))
    return bool(trainer.get("emas"))


def check_release(module: nn.Module, loaded: LoadedCheckpoint) -> None:
    """Raise CheckpointError (one line) when a DALLE2-pytorch file's release needs U-Nets built otherwise.

    `module` is a Decoder (its `unets`) or one U-Net. Files that record no release pass.
    """
    from .reference import release_mismatch

    unets = getattr(module, "unets", None)
    problem = release_mismatch(list(unets) if unets is not None else [module], loaded.reference_release, loaded.source)
    if problem:
        raise CheckpointError(problem)


def load_state_dict_checked(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Load `state_dict` into `module`, first checking every name and shape.

    Raises CheckpointMismatchError listing all missing, unexpected and mis-shaped tensors at once,
    instead of torch's first-failure message deep inside `load_state_dict`.
    """
    check_state_names(module, state_dict, source)
    module.load_state_dict(dict(state_dict), strict=True)


def check_state_names(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointMismatchError listing every name of `module`'s state missing from `state_dict`,
    every name it has that `module` lacks, and every (whole) shape that differs."""
    expected = module.state_dict()
    missing = sorted(name for name in expected if name not in state_dict)
    unexpected = sorted(name for name in state_dict if name not in expected)
    mismatched = sorted(
        f"{name} {tuple(state_dict[name].shape)} vs {tuple(expected[name].shape)}"
        for name in expected
        if name in state_dict and tuple(state_dict[name].shape) != tuple(expected[name].shape)
    )
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(source, missing, unexpected, mismatched)
