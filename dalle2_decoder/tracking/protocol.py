"""What the training loop may ask of a tracker: the `Tracker` of the main process and the
`NullTracker` of the others both satisfy `TrackerProtocol`, so the loop reads every attribute
directly and never asks which one it holds.

Attributes a do-nothing tracker has no value for are None there (`data_path`, `config_json`,
`config_dict`); the loop decides from the value, not from the tracker's type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

from .checkpoint import LoadedCheckpoint
from .loggers import ImagesLike

StateSource = Union[Mapping[str, Any], Callable[[], Mapping[str, Any]], None]
"""A state dict, or a function returning one (called only when some saver needs it)."""

Broadcast = Callable[[List[Any]], Any]
"""Broadcasts a one-element list in place from the main process, e.g. accelerate's `broadcast_object_list`."""


@runtime_checkable
class TrackerProtocol(Protocol):
    """Every attribute and method of a tracker that `training/` uses."""

    data_path: Optional[Path]
    """The run's folder of checkpoints and post-hoc EMA snapshots; None on processes that write nothing."""
    config_json: Optional[str]
    """The run's config (secrets masked) as JSON, as files record it; None on processes that write nothing."""
    config_dict: Optional[Dict[str, Any]]
    """The same config as a dict, what a resume compares the saved one with; None where not kept."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def log_images(self, name: str, images: ImagesLike, captions: Optional[Sequence[str]], step: int) -> None: ...

    def info(self, message: str) -> None: ...

    def log_summary(self, lines: Sequence[str]) -> None: ...

    def load(self, broadcast: Optional[Broadcast] = None) -> Optional[LoadedCheckpoint]:
        """The start checkpoint (every process: `broadcast` shares the main process's), or None."""
        ...

    def save(
        self,
        *,
        step: int,
        checkpoint_state: StateSource = None,
        model_state: StateSource = None,
        is_best: bool = False,
        fields: Optional[Mapping[str, Any]] = None,
    ) -> None: ...

    def staging_folder(self, step: int) -> Optional[Path]:
        """Where a sharded save's processes write their shards (None where nothing is written)."""
        ...

    def finish(self, success: bool = True, *, interrupted: bool = False) -> None: ...
