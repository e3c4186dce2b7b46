"""Checks of the world a config points at, run before anything starts (`--check` and every run).

The config alone is checked when it is loaded (`TrainDecoderConfig.from_dict`); here is what
needs the machine: the device, the local shards and embedding folders (present, agreeing in count
and dimension with each other and with the model), the data path and save folders (writable,
with room for a checkpoint), and the checkpoint to load (present and readable). One function,
`world_problems`, serves `--check` and the start of training and evaluation alike, so a run does
not fail later for a reason that was knowable at start.

Remote data (http, s3, `pipe:`) and remote checkpoints (url, wandb) are not fetched here: that
would cost what the run itself costs. Problems are `failures.Problem`s: an exit status and a line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Optional

from .common.files import existing_ancestor, unwritable_folder_reason
from .failures import EXIT_CHECKPOINT, EXIT_DATA, EXIT_IO, PreflightError, Problem, free_bytes

log = logging.getLogger(__name__)

SPACE_MARGIN = 1.2
"""Free space asked for: the checkpoints' estimated size times this (their metadata and samples)."""


# --- device -----------------------------------------------------------------------------------


def device_problems(device: str) -> List[Problem]:
    """`train.device` must exist here (launched runs get their device from the launcher instead)."""
    import torch

    from .runtime import launched

    if launched():
        return []
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return []  # reported by the config check
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            default = " (the default)" if device == "cuda:0" else ""
            return [
                Problem(
                    EXIT_IO,
                    f"train.device: {device!r}{default} but CUDA is not available on this machine; "
                    'set train.device to "cpu" (e.g. --set train.device=cpu) or run where a GPU is',
                )
            ]
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            return [
                Problem(
                    EXIT_IO,
                    f"train.device: {device!r} but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})",
                )
            ]
    elif parsed.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        return [Problem(EXIT_IO, f"train.device: {device!r} but MPS is not available on this machine")]
    elif parsed.type not in ("cpu", "cuda", "mps", "meta") and not _backend_available(parsed.type):
        return [Problem(EXIT_IO, f"train.device: {device!r}: no {parsed.type} device on this machine")]
    return []


def _backend_available(kind: str) -> bool:
    import torch

    module = getattr(torch, kind, None)
    is_available = getattr(module, "is_available", None)
    return bool(is_available()) if callable(is_available) else False


# --- data -------------------------------------------------------------------------------------


def data_problems(config) -> List[Problem]:
    """Local shards and embedding folders: present, in agreement, and enough for every split."""
    from .data import plan, sources

    data = config.data
    if sources.url_kind(data.webdataset_base_url) != "local":
        return []  # listed (or streamed) when the run starts; fetching here would cost as much
    problems: List[Problem] = []
    in_shards = data.embeddings_from_shards()
    folders = [
        (name, getattr(data, name))
        for name in ("img_embeddings_url", "text_embeddings_url")
        if getattr(data, name) and not in_shards
    ]
    for name, folder in folders:
        if sources.url_kind(folder) == "local" and not os.path.isdir(sources.local_path(folder)):
            what = "is a file, not a folder" if os.path.exists(sources.local_path(folder)) else "does not exist"
            problems.append(Problem(EXIT_DATA, f"data.{name}: the embedding folder {folder} {what}"))
    if problems:
        return problems
    try:
        shards = plan.configured_shards(data, embedding_folders=False)
    except (plan.DataSetupError, ValueError, OSError) as error:
        return [Problem(EXIT_DATA, f"data.webdataset_base_url: {error}")]
    numbers = [shard.number for shard in shards]
    problems += _not_tar_problems(shards)
    usable = set(numbers)
    for name, folder in folders:
        try:
            files = sources.list_embedding_files(folder)
        except Exception as error:
            problems.append(Problem(EXIT_DATA, f"data.{name}: cannot list {folder}: {error}"))
            continue
        usable &= set(files)
        without = [number for number in numbers if number not in files]
        if without and not data.skip_missing_shards:
            problems.append(
                Problem(
                    EXIT_DATA,
                    (
                        f"data.{name}: {len(without)} of {len(numbers)} shard(s) have no embedding file "
                        f"(*_<shard>.npy) in {folder}: {plan.shard_ranges(without)} "
                        "(set data.skip_missing_shards to leave those shards out)"
                    ),
                )
            )
        paired = [(shard, files[shard.number]) for shard in shards if shard.number in files]
        problems += _embedding_dim_problems(config, name, folder, paired)
    if in_shards:
        problems += _member_dim_problems(config, shards)
    problems += _split_problems(config, len(usable))
    return problems


def _not_tar_problems(shards) -> List[Problem]:
    """Local shards that are no tar archive at all (one 512-byte read each)."""
    from .data import sources
    from .data.tar_reader import not_a_tar_reason

    found = []
    for shard in shards:
        try:
            reason = not_a_tar_reason(sources.local_path(shard.url))
        except OSError as error:
            reason = f"unreadable: {error.strerror or error}"
        if reason:
            found.append(f"{shard.url} ({reason})")
    if not found:
        return []
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    return [
        Problem(
            EXIT_DATA,
            f"data.webdataset_base_url: {len(found)} shard(s) are not tar archives: {'; '.join(found[:3])}{more}",
        )
    ]


def _expected_dim(config, name: str) -> Optional[int]:
    if name == "img_embeddings_url":
        return config.decoder.unets[0].image_embed_dim
    dims = {unet.options.get("text_embed_dim") for unet in config.decoder.unets if unet.conditions_on_text}
    dims.discard(None)
    return dims.pop() if len(dims) == 1 else None


def _embedding_dim_problems(config, name: str, folder: str, paired) -> List[Problem]:
    """The first embedding files (headers only): one row per sample, of the dimension the U-Nets expect.

    Rows are compared with the shard's sample count where `sizes.json` holds a confirmed one (its
    byte size matches the shard): counting the tar itself is left to the run.
    """
    from .data import sources

    expected = _expected_dim(config, name)
    what = "image" if name == "img_embeddings_url" else "text"
    source = "decoder.unets[0].image_embed_dim" if what == "image" else "the U-Nets' text_embed_dim"
    sizes_url, known = sources.read_sizes_file(config.data.webdataset_base_url)
    for shard, url in paired[:64]:  # headers only: a few bytes each
        try:
            shape = sources.npy_shape(url)
        except Exception as error:
            return [Problem(EXIT_DATA, f"data.{name}: {url} is not a readable .npy file ({error})")]
        if len(shape) != 2:
            return [
                Problem(
                    EXIT_DATA,
                    f"data.{name}: {url} holds an array of shape {shape}; expected one row of "
                    f"{what} embedding per sample (rows x dimension)",
                )
            ]
        if expected is not None and shape[1] != expected:
            return [
                Problem(
                    EXIT_DATA,
                    f"data.{name}: {url} holds {shape[1]}-dimensional {what} embeddings but "
                    f"{source} is {expected} (expected {expected}, got {shape[1]})",
                )
            ]
        entry = known.get(sources.shard_file_name(shard.url))
        if entry and entry[1] is not None and entry[1] == sources.byte_size(shard.url) and shape[0] < entry[0]:
            return [
                Problem(
                    EXIT_DATA,
                    f"data.{name}: {url} has {shape[0]} rows but {shard.url} holds {entry[0]} "
                    f"samples (as {sizes_url} records): the embeddings belong to other shards "
                    "or were cut short",
                )
            ]
    return []


def _member_dim_problems(config, shards) -> List[Problem]:
    import io

    import numpy as np

    from .data.dataset import IMAGE_EMBED_MEMBERS
    from .data.loader import first_sample_members

    members = first_sample_members(shards)
    expected = config.decoder.unets[0].image_embed_dim
    for member in IMAGE_EMBED_MEMBERS:
        if member in members:
            try:
                shape = np.load(io.BytesIO(members[member]), allow_pickle=False).shape
            except Exception:
                return []  # a bad member is bad data, counted during the run
            if shape and shape[-1] != expected:
                return [
                    Problem(
                        EXIT_DATA,
                        (
                            f"data: the {member} members of {shards[0].url} hold {shape[-1]}-dimensional image "
                            f"embeddings but decoder.unets[0].image_embed_dim is {expected} "
                            f"(expected {expected}, got {shape[-1]})"
                        ),
                    )
                ]
    return []


def _split_problems(config, shard_count: int) -> List[Problem]:
    splits = config.data.splits
    asked = [name for name in ("train", "val", "test") if getattr(splits, name) > 0]
    if shard_count and shard_count < len(asked):
        return [
            Problem(
                EXIT_DATA,
                (
                    f"data.splits: {shard_count} shard(s) found in {config.data.start_shard}..{config.data.end_shard} "
                    f"but {len(asked)} splits ({', '.join(asked)}) need a shard each; add shards or set the unneeded "
                    "splits to 0"
                ),
            )
        ]
    return []


# --- paths ------------------------------------------------------------------------------------


def writable_problem(path: str, where: str) -> Optional[Problem]:
    """None when a file can be created at `path` (a folder, created if missing); else the problem."""
    reason = unwritable_folder_reason(path)
    return Problem(EXIT_IO, f"{where}: {reason}") if reason else None


def data_path_in_use_problem(config, data_path: str) -> Optional[Problem]:
    """A data path that holds another run (or anything) and may not be reused as configured.

    The same rule the tracker applies when it starts (`tracking.run_state.prepare_data_path`),
    checked here without touching the folder: an unreadable run state is refused whatever the
    options; an unfinished run is continued with `tracker.log.auto_resume` (when its recorded
    checkpoint is still there); anything else needs `tracker.overwrite_data_path`, which never
    clears a filesystem root, the home directory, or the current directory or its parents.
    """
    from .tracking.run_state import DataPathError, protected_folder_reason, read_run_state
    from .tracking.sharded import is_sharded_folder

    tracker = config.tracker
    if not os.path.isdir(data_path) or not os.listdir(data_path):
        return None
    try:
        previous = read_run_state(data_path)
    except DataPathError as error:
        return Problem(EXIT_IO, f"tracker.data_path: {error}")
    if previous is not None and not previous.finished and tracker.log.auto_resume:
        checkpoint = previous.latest_checkpoint
        if checkpoint and not (os.path.isfile(checkpoint) or is_sharded_folder(Path(checkpoint))):
            return Problem(
                EXIT_CHECKPOINT,
                f"tracker.data_path: the interrupted run {previous.run_id} in {data_path} records its latest "
                f"checkpoint at {checkpoint}, which is missing; restore that file, or delete run_state.json there "
                "to start over",
            )
        return None
    if tracker.overwrite_data_path:
        reason = protected_folder_reason(Path(data_path).resolve())
        if reason:
            return Problem(
                EXIT_IO,
                f"tracker.overwrite_data_path is set but {data_path} is not cleared: {reason}; choose another "
                "tracker.data_path",
            )
        return None
    if previous is not None and not previous.finished:
        found = (
            f"holds the interrupted run {previous.run_id} (step {previous.step}); set tracker.log.auto_resume "
            "to true to continue it, or"
        )
    elif previous is not None:
        found = f"holds the finished run {previous.run_id};"
    else:
        found = "is not empty;"
    return Problem(
        EXIT_IO,
        f"tracker.data_path: {data_path} {found} delete the folder yourself, choose another "
        "tracker.data_path, or set tracker.overwrite_data_path to true to delete its content",
    )


def estimated_checkpoint_bytes(config) -> Optional[int]:
    """Parameters x 4 bytes x (weights + two AdamW moments + EMA copy), from a model built without memory."""
    import torch

    try:
        with torch.device("meta"):
            decoder = config.decoder.create()
    except Exception:  # a model that cannot be built on the meta device: no estimate
        return None
    params = sum(p.numel() for p in decoder.parameters())
    copies = 3 + (1 if config.train.use_ema else 0)
    return params * 4 * copies


def save_problems(config) -> List[Problem]:
    """tracker.data_path and every local save folder writable, with space for what is saved there."""
    from .config.tracker import local_save_destinations

    tracker = config.tracker
    data_path = os.path.abspath(os.path.expanduser(tracker.data_path))
    problems: List[Problem] = []
    problem = writable_problem(data_path, "tracker.data_path") or data_path_in_use_problem(config, data_path)
    if problem:
        return [problem]
    several = isinstance(tracker.save, (list, tuple)) and len(tracker.save) > 1
    folders = [data_path]  # the staging copy of every save is written in the data path first
    for index, field, path in local_save_destinations(tracker, data_path):
        folder = str(path if field == "save_meta_to" else path.parent)
        where = f"tracker.save[{index}].{field}" if several else f"tracker.save.{field}"
        problem = writable_problem(folder, where)
        if problem:
            problems.append(problem)
        elif field != "save_meta_to":
            folders.append(folder)
    if problems:
        return problems
    size = estimated_checkpoint_bytes(config)
    if size is None:
        return []
    devices = {}
    for folder in folders:  # saves on the data path's filesystem are hard links to its staged copy
        try:
            devices.setdefault(os.stat(existing_ancestor(folder)).st_dev, folder)
        except OSError:
            continue
    needed = int(size * SPACE_MARGIN)
    for folder in devices.values():
        free = free_bytes(folder)
        if free is not None and free < needed:
            problems.append(
                Problem(
                    EXIT_IO,
                    (
                        f"tracker: no space left for a checkpoint on {existing_ancestor(folder)}: {_mb(free)} free, "
                        f"a checkpoint needs about {_mb(needed)} (free some space or choose another tracker.data_path)"
                    ),
                )
            )
    return problems


def _mb(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


# --- checkpoints ------------------------------------------------------------------------------

_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def checkpoint_file_problems(path: str, where: str) -> List[Problem]:
    """A checkpoint to load: present, a file, readable, not empty, and in a format torch or safetensors reads."""
    shown = os.path.expanduser(path)
    if not os.path.exists(shown):
        return [Problem(EXIT_CHECKPOINT, f"{where}: checkpoint file not found: {shown}")]
    if os.path.isdir(shown):
        return [
            Problem(
                EXIT_CHECKPOINT,
                f"{where}: {shown} is a folder; give the checkpoint file inside it "
                "(e.g. latest.pth or model.safetensors)",
            )
        ]
    try:
        with open(shown, "rb") as handle:
            head = handle.read(16)
    except OSError as error:
        return [Problem(EXIT_CHECKPOINT, f"{where}: cannot read {shown}: {error.strerror or error}")]
    if not head:
        return [Problem(EXIT_CHECKPOINT, f"{where}: {shown} is empty (0 bytes): an interrupted copy or save?")]
    if shown.endswith(".safetensors"):
        length = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
        if len(head) < 9 or head[8:9] != b"{" or length > os.path.getsize(shown):
            return [Problem(EXIT_CHECKPOINT, f"{where}: {shown} is not a safetensors file (no safetensors header)")]
        return []
    if not head.startswith(_MAGIC):
        return [
            Problem(
                EXIT_CHECKPOINT,
                f"{where}: {shown} is not a checkpoint written by torch.save (neither a "
                ".pth/.pt zip archive nor a safetensors file)",
            )
        ]
    return []


def load_problems(config) -> List[Problem]:
    from .config.tracker import LocalLoadConfig

    load = config.tracker.load
    if isinstance(load, LocalLoadConfig) and not load.only_auto_resume:
        return checkpoint_file_problems(load.file_path, "tracker.load.file_path")
    return []


# --- together ---------------------------------------------------------------------------------


def world_problems(config, *, purpose: str = "training") -> List[Problem]:
    """Every problem of the world `config` points at (see the module doc); empty when ready.

    `purpose`: "training" checks everything; "evaluation" leaves out the tracker's paths and load.
    """
    problems = device_problems(config.train.device)
    problems += data_problems(config)
    if purpose == "training":
        problems += save_problems(config)
        problems += load_problems(config)
    return problems


def ensure_ready(config, *, source: str = "", purpose: str = "training") -> None:
    """Raise `PreflightError` listing every world problem (see `world_problems`)."""
    problems = world_problems(config, purpose=purpose)
    if problems:
        raise PreflightError(problems, source=source)


__all__ = ["checkpoint_file_problems", "ensure_ready", "world_problems", "writable_problem"]
