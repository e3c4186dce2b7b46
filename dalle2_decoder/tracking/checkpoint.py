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

import os
import pickle
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

CHECKPOINT_FORMAT = "dalle2_decoder.checkpoint/1"
MODEL_FORMAT = "dalle2_decoder.model/1"

PathLike = Union[str, "os.PathLike[str]"]

_PLAIN_TYPES = (str, int, float, bool, type(None))


class CheckpointError(RuntimeError):
    """A checkpoint or model file cannot be written, read or used."""


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


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(temp_path)` on a temporary file beside `path`, then rename it over `path`.

    A reader sees the old file or the new one, never a partial write; a failed write leaves the
    old file untouched and removes the temporary one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temp)
        with open(temp, "rb") as handle:  # the data reaches the disk before the rename makes it visible
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target


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


def save_model(path: PathLike, model_state: Mapping[str, torch.Tensor], *, step: int, config_json: Optional[str] = None) -> Path:
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
    """The (secret-free) config the file was saved with, as JSON, when recorded."""
    state: Optional[Dict[str, Any]] = None
    """The trainer's `checkpoint_state`, for a checkpoint."""
    model_state: Optional[Dict[str, torch.Tensor]] = None
    """The weights, for a model save."""
    source: str = ""
    """Where the file came from (path, URL, wandb run file), for messages."""
    auto_resumed: bool = False
    """True when this is the latest checkpoint of an interrupted run being auto-resumed."""


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message: a generic first line, then the actual reason, then boilerplate
        reasons = [
            line.strip() for line in str(error).splitlines()[1:]
            if line.strip() and not line.strip().startswith(("Please file an issue", "Check the documentation"))
        ]
        detail = reasons[0] if reasons else "refused"
        raise CheckpointError(
            f"{path} could not be loaded with weights-only loading ({detail}): it is not a checkpoint, or it "
            "holds objects other than tensors and plain containers, which are not unpickled because that "
            "could run arbitrary code"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable checkpoint or model file ({error})") from error


def read_file(path: PathLike) -> LoadedCheckpoint:
    """Read a checkpoint or model file written by this package (or a plain state dict of tensors)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from error
        return LoadedCheckpoint(
            "model", int(metadata.get("step", 0)), metadata.get("config"), model_state=tensors, source=str(path)
        )

    payload = _torch_load(path)
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        return LoadedCheckpoint(
            "checkpoint", int(payload["step"]), payload.get("config"), state=payload["state"], source=str(path)
        )
    if isinstance(payload, dict) and payload.get("format") == MODEL_FORMAT:
        return LoadedCheckpoint(
            "model", int(payload["step"]), payload.get("config"), model_state=payload["model"], source=str(path)
        )
    if isinstance(payload, dict) and payload and all(isinstance(value, torch.Tensor) for value in payload.values()):
        return LoadedCheckpoint("model", 0, None, model_state=payload, source=str(path))
    raise CheckpointError(
        f"{path} is neither a checkpoint nor a model save of dalle2_decoder (no recognised 'format' entry) "
        "nor a plain state dict of tensors"
    )


def load_state_dict_checked(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load `state_dict` into `module`, first checking every name and shape.

    Raises CheckpointMismatchError listing all missing, unexpected and mis-shaped tensors at once,
    instead of torch's first-failure message deep inside `load_state_dict`.
    """
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
    module.load_state_dict(dict(state_dict), strict=True)


def load_model_weights(model: nn.Module, path: PathLike) -> LoadedCheckpoint:
    """Load a `model` save (safetensors or weights-only `.pt`) into `model` with strict name and shape checks.

    Returns the file's content (its `config_json` and `step` tell what it was saved from).
    """
    loaded = read_file(path)
    if loaded.kind != "model":
        raise CheckpointError(
            f"{path} is a training checkpoint, not a model save; resume from it with tracker.load, "
            "or save with save_type 'model' to get weights that load into a decoder"
        )
    load_state_dict_checked(model, loaded.model_state, source=str(path))
    return loaded


# --- random number generator states ------------------------------------------------------------


def capture_rng_state() -> Dict[str, Any]:
    """The RNG states of torch (CPU and CUDA), Python's `random` and numpy, all weights-only storable."""
    import numpy as np

    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `capture_rng_state` returned (CUDA states only where CUDA is available)."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
