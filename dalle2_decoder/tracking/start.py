"""The checkpoint a run starts from: the interrupted run's latest (auto-resume), else `tracker.load`.

`Tracker.load` calls `load_start_checkpoint` on the main process and broadcasts what it returns.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from .checkpoint import CheckpointError, LoadedCheckpoint, read_file
from .loaders import LoadError, LocalLoader, PartsLoader, UrlLoader, WandbLoader
from .run_state import RunState
from .sharded import is_sharded_folder

Loader = Union[LocalLoader, UrlLoader, WandbLoader, PartsLoader]


def load_start_checkpoint(
    loader: Optional[Loader],
    *,
    run_state: RunState,
    auto_resuming: bool,
    data_path: Path,
    config_dict: Mapping[str, Any],
    say: Callable[[str], None],
) -> Optional[LoadedCheckpoint]:
    """The checkpoint to start from, or None to start fresh.

    An interrupted run's latest local checkpoint wins (auto-resume); otherwise `loader`, unless it
    is `only_auto_resume` and this run is not being auto-resumed. `config_dict` is the run's
    config as data (the U-Nets a file must fit); `say` prints a progress line.
    """
    if auto_resuming and run_state.latest_checkpoint:
        path = Path(run_state.latest_checkpoint)
        if not (path.is_file() or is_sharded_folder(path)):
            raise LoadError(
                f"the interrupted run in {data_path} records its latest checkpoint at {path}, which is "
                "missing; restore that file, or delete run_state.json there to start over"
            )
        say(f"auto-resume: loading the interrupted run's latest checkpoint {path}")
        return dataclasses.replace(read_file(path), source=f"auto-resume {path}", auto_resumed=True)
    if loader is None:
        return None
    if loader.config.only_auto_resume and not auto_resuming:
        say(f"tracker.load ({loader.describe()}) is only_auto_resume and this run is new: starting fresh")
        return None
    say(f"loading the start checkpoint from {loader.describe()}")
    if isinstance(loader, PartsLoader):
        return _load_parts(loader, config_dict, auto_resuming)
    path = loader.fetch()
    loaded = dataclasses.replace(read_file(path), source=loader.describe(), auto_resumed=auto_resuming)
    _check_release(loaded, config_dict)
    return loaded


def _check_release(loaded: LoadedCheckpoint, config_dict: Mapping[str, Any]) -> None:
    """A file of an earlier DALLE2-pytorch release needs the run's U-Nets configured as that release's."""
    from types import SimpleNamespace

    from .reference import release_mismatch

    decoder = config_dict.get("decoder") if isinstance(config_dict, Mapping) else None
    unets = decoder.get("unets") if isinstance(decoder, Mapping) else None
    if not isinstance(unets, list):
        return
    built = [
        SimpleNamespace(reference_release=u.get("reference_release") if isinstance(u, Mapping) else None) for u in unets
    ]
    problem = release_mismatch(built, loaded.reference_release, loaded.source)
    if problem:
        raise CheckpointError(problem)


def _load_parts(loader: PartsLoader, config_dict: Mapping[str, Any], auto_resuming: bool) -> LoadedCheckpoint:
    """A decoder assembled from the U-Nets of several files, checked against this run's decoder."""
    from ..config.root import TrainDecoderConfig
    from .parts import UnetPart, assemble

    parts = []
    for source, part_loader in zip(loader.config.unet_sources, loader.loaders):
        loaded = dataclasses.replace(read_file(part_loader.fetch()), source=part_loader.describe())
        numbers = source.file_unet_numbers or [None] * len(source.unet_numbers)
        parts += [UnetPart(slot, loaded, number) for slot, number in zip(source.unet_numbers, numbers)]
    config = TrainDecoderConfig.from_dict(config_dict)
    _, state = assemble(config, parts, use_ema=loader.config.use_ema, slots_built_as_configured=True)
    notes = tuple(note for part in parts for note in part.loaded.notes)
    return LoadedCheckpoint(
        "model", 0, None, model_state=state, source=loader.describe(), auto_resumed=auto_resuming, notes=notes
    )
