"""What one save writes: each file staged once, then listed per saver with its destination.

`Tracker.save` stages a checkpoint, a model and the run's metadata only when some saver asks for
them (`StagedFiles`), and hands each saver its `SaveFile`s (`plan_saves`); where they land and
what retention does afterwards stay with the tracker.
"""

from __future__ import annotations

import datetime
import json
import platform
import socket
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple, Union

from .run_state import RunState
from .savers import SaveFile, Saver
from .sharded import ShardedCheckpoint

StateSource = Union[Mapping[str, Any], Callable[[], Mapping[str, Any]], None]
"""A state dict, or a function returning one (called only when some saver needs it)."""

Writer = Callable[[Path, Mapping[str, Any]], Path]
"""Writes a state dict to a path as a checkpoint or a model file, returning the path written."""


def state_of(source: StateSource, name: str) -> Mapping[str, Any]:
    """The state dict `source` gives (calling it when it is a function)."""
    if source is None:
        raise ValueError(f"a saver needs {name}, but save() was called without it")
    return source() if callable(source) else source


class StagedFiles:
    """The files of one save, each written once under `staging` when a saver first asks for it.

    `checkpoint_state` may be a `ShardedCheckpoint` (a folder all processes wrote), completed with
    its `checkpoint.pt` by `write_checkpoint`. `metadata()` returns the JSON files of
    `save_meta_to`, written from what `meta_documents` returns (file name -> JSON value).
    """

    def __init__(
        self,
        staging: Path,
        *,
        checkpoint_state: StateSource,
        model_state: StateSource,
        write_checkpoint: Writer,
        write_model: Writer,
        meta_documents: Callable[[], Mapping[str, Any]],
    ):
        self.staging = staging
        self.checkpoint_state = checkpoint_state
        self.model_state = model_state
        self.write_checkpoint = write_checkpoint
        self.write_model = write_model
        self.meta_documents = meta_documents
        self.artifacts: Dict[Tuple[str, str], Path] = {}
        """What was staged: (save_type, suffix) -> its file (or a sharded checkpoint's folder)."""
        self._meta_files: List[Path] = []

    def artifact(self, kind: str, suffix: str) -> Path:
        """The staged `kind` ("checkpoint" or "model") file with `suffix` (".pt" or ".safetensors")."""
        if (kind, suffix) not in self.artifacts:
            if kind == "checkpoint" and isinstance(self.checkpoint_state, ShardedCheckpoint):
                path = self.checkpoint_state.write(self.write_checkpoint)
            elif kind == "checkpoint":
                state = state_of(self.checkpoint_state, "checkpoint_state")
                path = self.write_checkpoint(self.staging / f"checkpoint{suffix}", state)
            else:
                path = self.write_model(self.staging / f"model{suffix}", state_of(self.model_state, "model_state"))
            self.artifacts[(kind, suffix)] = path
        return self.artifacts[(kind, suffix)]

    def metadata(self) -> List[Path]:
        """The staged metadata files (the config and the run's metadata)."""
        if not self._meta_files:
            folder = self.staging / "meta"
            folder.mkdir(parents=True, exist_ok=True)
            for name, document in self.meta_documents().items():
                (folder / name).write_text(json.dumps(document, indent=2) + "\n")
                self._meta_files.append(folder / name)
        return self._meta_files


def plan_saves(
    savers: Sequence[Saver], staged: StagedFiles, fields: Mapping[str, Any], is_best: bool
) -> List[Tuple[Saver, List[SaveFile]]]:
    """Each saver with the files it places this save (savers with none are left out): its latest
    (and, when `is_best`, best) path with `fields` filled in, and its metadata folder."""
    plans = []
    for saver in savers:
        files = []
        targets = [saver.config.save_latest_to] + ([saver.config.save_best_to] if is_best else [])
        for dest in filter(None, targets):
            suffix = ".safetensors" if dest.endswith(".safetensors") else ".pt"
            files.append(SaveFile(staged.artifact(saver.config.save_type, suffix), dest.format(**fields)))
        if saver.config.save_meta_to:
            folder = saver.config.save_meta_to.rstrip("/")
            files.extend(SaveFile(local, f"{folder}/{local.name}") for local in staged.metadata())
        if files:
            plans.append((saver, files))
    return plans


def run_metadata(run_state: RunState, step: int, is_best: bool) -> Dict[str, Any]:
    """`run_metadata.json` of a save: the run, the step, when and where, and the versions that wrote it."""
    import torch

    from .._version import __version__

    return {
        "run_id": run_state.run_id,
        "wandb_run_path": run_state.wandb_run_path,
        "step": step,
        "is_best": is_best,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "started_at": datetime.datetime.fromtimestamp(run_state.started_at, datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "attempts": run_state.attempts,
        "host": socket.gethostname(),
        "versions": {
            "dalle2_decoder": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
