"""Sharded checkpoints: a folder in which every process writes its own shards, and nothing whole.

A sharded (FSDP) run saves with `torch.distributed.checkpoint` (DCP): each process writes the
shards it holds of the trained U-Nets, their optimizer moments and their EMAs to one safetensors
file of its own (DCP's Hugging Face storage writer; tensors written once when several processes
hold the same whole tensor, as the frozen U-Nets); the main process adds `checkpoint.pt`, the
usual weights-only checkpoint file (`tracking.checkpoint`) with everything else (progress, RNG
states, schedulers, counters, config), small. No process ever holds the whole state:

    latest.pth -> .latest.pth.versions/step_4096-1a2b3c4d/    (a link, replaced atomically)
        checkpoint.pt
        shard-00001-model-00001-of-00001.safetensors           (process 0's shards)
        shard-00002-model-00001-of-00001.safetensors           (process 1's)

Reading never unpickles anything: `checkpoint.pt` is loaded weights-only and the shards are
safetensors whose placement (offsets) is JSON in their headers. A reader asks for the pieces it
needs by key and DCP reads the overlapping parts, so a checkpoint written by 2 processes loads on
1, 2 or 3 (`load_into`), or whole into one process (`read_whole`) for a DDP run, `load_decoder` or
the evaluation command.

Tensor keys: `decoder/<name in Decoder.state_dict()>`, `emas/<unet number>/<name in EMA.state_dict()>`,
`optimizers/<unet number>/<parameter name in the U-Net>/<state name>` (exp_avg, exp_avg_sq, step).
`checkpoint.pt`'s `state['trainer']['sharded']` says so; `whole_trainer_state` turns a folder into
the trainer state of a whole checkpoint (the layout `DecoderTrainer.state_dict()` writes).
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import torch

from ..common.files import fsync_folder
from .checkpoint import CheckpointFormatError

SHARDED_FORMAT = "dalle2_decoder.sharded/1"
STATE_FILE = "checkpoint.pt"
SHARD_SUFFIX = ".safetensors"


@dataclass
class ShardedCheckpoint:
    """A sharded checkpoint whose shards every process wrote into `folder` (what a sharded run hands
    `Tracker.save`); the tracker adds `checkpoint.pt` from `state` when a saver needs the checkpoint."""

    folder: Path
    """The shards' folder, inside the save's `staging` folder."""
    staging: Path
    """The save's staging folder (under `data_path/.staging/`), removed once the save is placed."""
    state: Callable[[], Mapping[str, Any]]
    """The checkpoint's `state` without the sharded tensors (see `tracking.checkpoint`)."""
    _written: bool = False

    def write(self, save: Callable[[Path, Mapping[str, Any]], Path]) -> Path:
        """Write `checkpoint.pt` once with `save(path, state)` (the tracker's checkpoint writer)."""
        if not self._written:
            save(self.folder / STATE_FILE, self.state())
            self._written = True
        return self.folder


def is_sharded_folder(path: Path) -> bool:
    """Whether `path` (a folder, or a link to one) looks like a sharded checkpoint."""
    path = Path(path)
    return path.is_dir() and (path / STATE_FILE).is_file() and any(path.glob("*" + SHARD_SUFFIX))


def shard_files(folder: Path) -> List[Path]:
    return sorted(Path(folder).glob("*" + SHARD_SUFFIX))


# --- writing (every process) -------------------------------------------------------------------


def write_shards(folder: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Every process calls this with its view of the same keys (sharded tensors as DTensors): each
    writes its own safetensors file into `folder` (a collective: DCP plans the writes together)."""
    import torch.distributed.checkpoint as dcp

    Path(folder).mkdir(parents=True, exist_ok=True)
    writer = dcp.HuggingFaceStorageWriter(str(folder), save_distributed=True)
    dcp.save(dict(tensors), storage_writer=writer)


# --- reading ---------------------------------------------------------------------------------


def _damaged(folder: Path, what: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{folder}: a sharded checkpoint folder {what}")


def check_folder(folder: Path, expected_files: Optional[int]) -> None:
    """A one-line error when shard files are missing (a save cut short, a file removed)."""
    found = shard_files(folder)
    if expected_files is not None and len(found) != expected_files:
        raise _damaged(
            folder,
            f"with {len(found)} of the {expected_files} shard files its {STATE_FILE} records; the save was cut "
            "short or files were removed",
        )


def stored_shapes(folder: Path) -> Dict[str, torch.Size]:
    """The whole shape of every tensor the folder holds, by key (read from the shard headers only)."""
    import torch.distributed.checkpoint as dcp

    try:
        metadata = dcp.HuggingFaceStorageReader(str(folder)).read_metadata()
    except Exception as error:  # safetensors' and DCP's own errors: name the folder in one line
        raise _damaged(folder, f"whose shard files cannot be read ({type(error).__name__}: {error})") from error
    return {key: meta.size for key, meta in metadata.state_dict_metadata.items()}


def load_into(folder: Path, targets: Mapping[str, torch.Tensor], *, whole: bool = False) -> None:
    """Fill `targets` (tensors or DTensors, by key) in place with the folder's values.

    Every process of the run calls it together (a collective), each with the targets it holds;
    each reads only the parts of the files its targets cover. `whole`: this process alone reads
    (no collective), e.g. a DDP run or `load_decoder` taking the whole tensors.
    """
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(dict(targets), storage_reader=dcp.HuggingFaceStorageReader(str(folder)), no_dist=whole)
    except Exception as error:
        raise _damaged(folder, f"that does not load ({type(error).__name__}: {str(error).splitlines()[0]})") from error


def read_whole(folder: Path, keys: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """The whole tensors of the folder (or of `keys`), read by this process alone, on the CPU."""
    shapes = stored_shapes(folder)
    wanted = list(shapes) if keys is None else [key for key in keys if key in shapes]
    dtypes = _stored_dtypes(folder)
    targets = {key: torch.empty(shapes[key], dtype=dtypes[key]) for key in wanted}
    if targets:
        load_into(folder, targets, whole=True)
    return targets


def _stored_dtypes(folder: Path) -> Dict[str, torch.dtype]:
    import torch.distributed.checkpoint as dcp

    metadata = dcp.HuggingFaceStorageReader(str(folder)).read_metadata()
    return {key: meta.properties.dtype for key, meta in metadata.state_dict_metadata.items()}


def whole_trainer_state(folder: Path, trainer: Mapping[str, Any], *, optimizers: bool = True) -> Dict[str, Any]:
    """The trainer state of a whole checkpoint from a sharded folder: `decoder`, `emas` and (with
    `optimizers`) `optimizers_by_name` hold whole tensors, the rest is `trainer` as saved."""
    wanted = None if optimizers else [key for key in stored_shapes(folder) if not key.startswith("optimizers/")]
    tensors = read_whole(folder, wanted)
    state: Dict[str, Any] = {key: value for key, value in trainer.items() if key != "sharded"}
    decoder: Dict[str, torch.Tensor] = {}
    emas: Dict[str, Dict[str, torch.Tensor]] = {}
    by_name: Dict[str, Dict[str, Any]] = {}
    for key, tensor in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "decoder":
            decoder[rest] = tensor
        elif kind == "emas":
            number, _, name = rest.partition("/")
            emas.setdefault(number, {})[name] = tensor
        elif kind == "optimizers":
            number, _, rest = rest.partition("/")
            name, _, entry = rest.rpartition("/")
            by_name.setdefault(number, {"state": {}})["state"].setdefault(name, {})[entry] = tensor
    if not decoder:
        raise _damaged(folder, "without decoder weights")
    state.update(decoder=decoder, emas=emas, optimizers_by_name=by_name)
    state.pop("optimizers", None)
    return state


# --- placing a folder at a destination ------------------------------------------------------------


def versions_folder(target: Path) -> Path:
    """Where the folders a link `target` points to are kept: `.<name>.versions` beside it."""
    return target.parent / f".{target.name}.versions"


def place_folder(source: Path, target: Path) -> Path:
    """Make `target` a link to a complete copy of the folder `source`, replacing what was there at once.

    The copy is made of hard links (no data copied where the filesystem allows) in a temporary
    folder, renamed into `.<name>.versions/`; then a new link replaces `target` by one rename, so
    `target` is always the whole old checkpoint or the whole new one. Older versions are removed
    after. A `target` that is a real folder is refused (it is not this package's to replace).
    """
    source, target = Path(source), Path(target)
    if target.is_dir() and not target.is_symlink():
        raise CheckpointFormatError(
            f"cannot save a sharded checkpoint at {target}: it is a folder, not a link this package made; move it away"
        )
    store = versions_folder(target)
    store.mkdir(parents=True, exist_ok=True)
    version = store / f"{source.parent.name}-{uuid.uuid4().hex[:6]}"
    temp = store / f"{version.name}.tmp"
    shutil.copytree(source, temp, copy_function=_link_or_copy_file)
    for file in temp.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    fsync_folder(temp)
    os.rename(temp, version)
    fsync_folder(store)
    link = target.parent / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    os.symlink(os.path.relpath(version, target.parent), link)
    os.replace(link, target)
    fsync_folder(target.parent)
    remove_unlinked_versions(target)
    return target


def _link_or_copy_file(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def remove_save(target: Path) -> None:
    """Remove a save at `target`: a file, or a link `place_folder` made together with its versions.

    The link goes first, so that no kill leaves a link to a half-removed folder; a kill before the
    versions are gone leaves them with no link, and calling this again (retention retries every path
    its run state still lists) removes them. Nothing is an error when already gone.
    """
    target = Path(target)
    target.unlink(missing_ok=True)
    store = versions_folder(target)
    if store.is_dir() and not store.is_symlink():
        shutil.rmtree(store)


def remove_unlinked_versions(target: Path) -> List[Path]:
    """Remove the versions beside `target` that it does not link to (older saves, cut-short copies)."""
    store = versions_folder(Path(target))
    if not store.is_dir():
        return []
    keep = Path(target).resolve() if Path(target).is_symlink() else None
    removed = []
    for entry in sorted(store.iterdir()):
        if keep is not None and entry.resolve() == keep:
            continue
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        removed.append(entry)
    if not any(store.iterdir()):
        store.rmdir()
    return removed
