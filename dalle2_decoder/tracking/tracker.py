"""The tracker: one object that logs, loads the start checkpoint and saves, built once at setup.

`create_tracker` (`tracking/build.py`) returns a `Tracker` on the main process and a `NullTracker`
(same methods, does nothing) on every other process, so the training loop calls the same methods
on every rank and never asks which rank it is. See docs/TRACKING.md for the protocol the trainer
follows. What one save writes is `tracking/save_plan.py`; where it lands, `tracking/destinations.py`.
"""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..common.files import atomic_write_text
from ..config.tracker import LocalLoadConfig, TrackerConfig, UnetSourcesLoadConfig
from .build import Logger, TrackerSetupError, create_tracker, sharded_checkpoint_problems
from .checkpoint import LoadedCheckpoint, save_checkpoint, save_model
from .destinations import (
    RESUME_CHECKPOINT,
    RESUME_SHARDED,
    local_destinations,
    protected_paths,
    save_path_fields,
    saves_wanted,
)
from .loggers import ImagesLike, to_uint8_images
from .redact import OUTPUT, scrub_strings
from .run_state import SUMMARY_FILE, RunState, clean_staging, write_run_state
from .save_plan import StagedFiles, StateSource, Writer, plan_saves, run_metadata, state_of
from .savers import LocalSaver, SaveFile, Saver, Uploader, link_or_copy
from .sharded import ShardedCheckpoint, place_folder, remove_save
from .start import Loader, load_start_checkpoint

__all__ = [
    "RESUME_CHECKPOINT",
    "RESUME_SHARDED",
    "Broadcast",
    "NullTracker",
    "StateSource",
    "Tracker",
    "TrackerSetupError",
    "create_tracker",
    "local_destinations",
    "protected_paths",
    "save_path_fields",
    "saves_wanted",
    "sharded_checkpoint_problems",
]

Broadcast = Callable[[List[Any]], Any]
"""Broadcasts a one-element list in place from the main process, e.g. accelerate's `broadcast_object_list`."""


class NullTracker:
    """The tracker of every process but the main one: the same methods, doing nothing.

    It has the `Tracker` attributes the training loop reads, each None: only the main process
    writes run files. `load(broadcast=...)` still takes part in the broadcast, so every rank reaches it.
    """

    data_path: Optional[Path]
    """The run's folder; None: this process writes no run files."""
    config_json: Optional[str]
    """The run config as JSON (secrets masked), as saves hold it; None: this process saves nothing."""
    config_dict: Optional[Dict[str, Any]]
    """The run config as data (secrets masked); None: the caller uses its own config."""

    def __init__(self) -> None:
        self.data_path = None
        self.config_json = None
        self.config_dict = None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def log_images(self, name: str, images: ImagesLike, captions: Optional[Sequence[str]], step: int) -> None:
        pass

    def info(self, message: str) -> None:
        pass

    def log_summary(self, lines: Sequence[str]) -> None:
        pass

    def load(self, broadcast: Optional[Broadcast] = None) -> Optional[LoadedCheckpoint]:
        if broadcast is None:
            return None
        received: List[Any] = [None]
        broadcast(received)
        return received[0]

    def save(self, *, step: int, **contents: Any) -> None:
        """Takes what `Tracker.save` takes, and saves nothing."""

    def wait_for_uploads(self) -> None:
        pass

    def staging_folder(self, step: int) -> None:
        return None

    def finish(self, success: bool = True, *, interrupted: bool = False) -> None:
        pass

    def __enter__(self) -> "NullTracker":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.finish(success=exc_type is None)


class Tracker:
    """The main process's tracker. Build it with `create_tracker`."""

    def __init__(
        self,
        config: TrackerConfig,
        *,
        data_path: Path,
        logger: Logger,
        loader: Optional[Loader],
        savers: List[Saver],
        uploader: Uploader,
        run_state: RunState,
        auto_resuming: bool,
        config_dict: Dict[str, Any],
        known_secrets: Sequence[str] = (),
        restore_argv: Optional[List[str]] = None,
    ):
        self.config = config
        self.data_path = data_path
        self.logger = logger
        self.loader = loader
        self.savers = savers
        self.uploader = uploader
        self.run_state = run_state
        self.auto_resuming = auto_resuming
        self.config_dict = config_dict
        self.config_json = json.dumps(config_dict)
        self._known_secrets = list(known_secrets)
        self._restore_argv = restore_argv
        self._finished = False

    @property
    def known_secrets(self) -> List[str]:
        """Every secret masked in what this tracker writes: the config's, the hub tokens, the environment's."""
        return self._known_secrets + OUTPUT.secrets

    # --- logging -------------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        """The run's id (the wandb run id when logging to wandb); kept across auto-resumes."""
        return self.run_state.run_id

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalar metrics (floats, ints or 0-dim tensors) at `step`."""
        self.logger.log(metrics, step)

    def log_images(self, name: str, images: ImagesLike, captions: Optional[Sequence[str]], step: int) -> None:
        """Log sample images under `name`: a (B, 3, H, W) tensor in [0, 1] or a list of images.

        `captions`: one caption per image, or None.
        """
        self.logger.log_images(name, to_uint8_images(images), captions, step)

    def info(self, message: str) -> None:
        """Print a progress message (main process only, like everything here), secrets masked."""
        print(OUTPUT.text(message), flush=True)

    def log_summary(self, lines: Sequence[str]) -> None:
        """Print the run's start-up summary and keep it in `data_path/summary.txt` (for the report)."""
        masked = [OUTPUT.text(line) for line in lines]
        for line in masked:
            print(line, flush=True)
        atomic_write_text(self.data_path / SUMMARY_FILE, "".join(line + "\n" for line in masked))

    # --- loading -------------------------------------------------------------------------------

    def load(self, broadcast: Optional[Broadcast] = None) -> Optional[LoadedCheckpoint]:
        """The checkpoint to start from, or None to start fresh (see `start.load_start_checkpoint`).

        With `broadcast`, the result is sent to every process (each calls `load(broadcast)`).
        """
        loaded = load_start_checkpoint(
            self.loader,
            run_state=self.run_state,
            auto_resuming=self.auto_resuming,
            data_path=self.data_path,
            config_dict=self.config_dict,
            say=self.info,
        )
        if broadcast is not None:
            sent: List[Any] = [loaded]
            broadcast(sent)
        return loaded

    # --- saving --------------------------------------------------------------------------------

    def save(
        self,
        *,
        step: int,
        checkpoint_state: StateSource = None,
        model_state: StateSource = None,
        is_best: bool = False,
        fields: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """Save to every configured saver.

        `fields` fill in the `{epoch}`-style fields of `save_latest_to` / `save_best_to` (see
        `config.tracker.SAVE_PATH_FIELDS`); `samples_seen` defaults to `step`.
        `checkpoint_state`: everything needed to resume (for `save_type: checkpoint`); `model_state`:
        the decoder's weights, EMA ones when EMA is on (for `save_type: model`). Either may be a
        function, called only if some saver needs it. `is_best`: also write the `save_best_to` paths.
        A sharded run passes a `ShardedCheckpoint` instead (a folder all its processes wrote under
        `staging_folder(step)`), which local savers place as a link to a copy of the folder.
        Local writes finish before this returns; uploads go on in the background (`wait_for_uploads`).
        """
        fields = save_path_fields(step, fields)
        sharded = checkpoint_state if isinstance(checkpoint_state, ShardedCheckpoint) else None
        staged = StagedFiles(
            sharded.staging if sharded else self.staging_folder(step),
            checkpoint_state=checkpoint_state,
            model_state=model_state,
            write_checkpoint=self._checkpoint_writer(step),
            write_model=lambda path, state: save_model(path, state, step=step, config_json=self.config_json),
            meta_documents=lambda: {
                "config.json": self.config_dict,
                "run_metadata.json": run_metadata(self.run_state, step, is_best),
            },
        )
        try:
            plans = plan_saves(self.savers, staged, fields, is_best)
            for saver, files in plans:
                if not saver.remote:
                    self.uploader.submit(saver, files, step)
            # Retention: the files written are recorded before any old one is deleted, and only once
            # the new ones are whole on disk (local puts are atomic and done), so a kill at any point
            # leaves at least the last good file, and every file it may delete is recorded.
            written = [
                saver.resolve(file.dest) for saver, files in plans if isinstance(saver, LocalSaver) for file in files
            ]
            old_saves = self._track_local_saves(fields, is_best)
            self._record_resume_point(step, staged.artifacts, checkpoint_state, fields)
            if any(isinstance(saver, LocalSaver) and saver.config.keep_last for saver in self.savers):
                write_run_state(self.data_path, self.run_state)  # what was written, before anything goes
                if old_saves:
                    self._delete_old_saves(old_saves, keep=written)
                    write_run_state(self.data_path, self.run_state)  # and what is left

            for saver, files in plans:
                if saver.remote:
                    self._submit_upload(saver, files, step)
        finally:
            shutil.rmtree(staged.staging, ignore_errors=True)

    def _track_local_saves(self, fields: Mapping[str, Any], is_best: bool) -> Dict[str, List[Path]]:
        """Record in the run state the files this save wrote where retention applies (and the best
        saves, which it never deletes); return, per saver, the recorded files beyond its `keep_last`."""
        old: Dict[str, List[Path]] = {}
        for saver in self.savers:
            if not isinstance(saver, LocalSaver):
                continue
            config = saver.config
            if is_best and config.save_best_to:
                best = str(saver.resolve(config.save_best_to.format(**fields)))
                if best not in self.run_state.best_files:
                    self.run_state.best_files.append(best)
            if config.keep_last is None or not config.save_latest_to:
                continue
            key = f"save[{self.config.save.index(config)}] {config.save_latest_to}"
            latest = str(saver.resolve(config.save_latest_to.format(**fields)))
            tracked = [path for path in self.run_state.saved_files.get(key, []) if path != latest] + [latest]
            self.run_state.saved_files[key] = tracked
            if len(tracked) > config.keep_last:
                old[key] = [Path(path) for path in tracked[: -config.keep_last]]
        return old

    def never_deleted(self) -> List[Path]:
        """Files retention must keep whatever the counts say: the `tracker.load` file(s), every best
        save, and the run's resume point."""
        keep = [Path(path) for path in self.run_state.best_files]
        if self.run_state.latest_checkpoint:
            keep.append(Path(self.run_state.latest_checkpoint))
        load = self.config.load
        sources = (
            [source.load_model_from for source in load.unet_sources]
            if isinstance(load, UnetSourcesLoadConfig)
            else [load]
        )
        keep += [Path(source.file_path).expanduser() for source in sources if isinstance(source, LocalLoadConfig)]
        return [path.resolve() for path in keep]

    def _delete_old_saves(self, old: Dict[str, List[Path]], keep: Sequence[Path]) -> None:
        """Delete the recorded files beyond each saver's `keep_last` (never one of `never_deleted()`, nor
        a file this save just wrote), then forget them; the run state of the next save records that."""
        protected = set(self.never_deleted()) | {path.resolve() for path in keep}
        for key, paths in old.items():
            for path in paths:
                if path.resolve() not in protected:
                    # a file, or a sharded checkpoint's link and folder; gone already: a kill came after
                    remove_save(path)
            dropped = {str(path) for path in paths}
            self.run_state.saved_files[key] = [item for item in self.run_state.saved_files[key] if item not in dropped]

    def staging_folder(self, step: int) -> Path:
        """A new folder for a save's files (a sharded run's processes all write their shards there)."""
        return self.data_path / ".staging" / f"step_{step}-{uuid.uuid4().hex[:8]}"

    def _checkpoint_writer(self, step: int) -> Writer:
        """Writes a checkpoint file (a sharded checkpoint's `checkpoint.pt` too), secrets scrubbed."""

        def write(path: Path, state: Mapping[str, Any]) -> Path:
            return save_checkpoint(
                path, scrub_strings(state, self.known_secrets), step=step, config_json=self.config_json
            )

        return write

    def _submit_upload(self, saver: Saver, files: List[SaveFile], step: int) -> None:
        """Hand an upload to the uploader, from copies under `uploads/<saver>/` (kept there when it fails)."""
        folder = self.data_path / "uploads" / f"saver{self.savers.index(saver)}-{type(saver).__name__}"
        self.uploader.submit_from_copies(saver, files, step, folder)

    def _record_resume_point(
        self,
        step: int,
        artifacts: Dict[Tuple[str, str], Path],
        checkpoint_state: StateSource,
        fields: Mapping[str, Any],
    ) -> None:
        """Remember the latest local resumable checkpoint in run_state.json (for auto-resume)."""
        latest: Optional[Path] = None
        for saver in self.savers:
            config = saver.config
            if isinstance(saver, LocalSaver) and config.save_type == "checkpoint" and config.save_latest_to:
                latest = saver.resolve(config.save_latest_to.format(**fields))
        if latest is None and isinstance(checkpoint_state, ShardedCheckpoint):
            if not (self.config.log.auto_resume or any(kind == "checkpoint" for kind, _ in artifacts)):
                return
            checkpoint_state.write(self._checkpoint_writer(step))
            latest = place_folder(checkpoint_state.folder, self.data_path / RESUME_SHARDED)
        elif latest is None:
            have_state = ("checkpoint", ".pt") in artifacts or (
                self.config.log.auto_resume and checkpoint_state is not None
            )
            if not have_state:
                return
            latest = self.data_path / RESUME_CHECKPOINT
            staged = artifacts.get(("checkpoint", ".pt"))
            if staged is None:
                self._checkpoint_writer(step)(latest, state_of(checkpoint_state, "checkpoint_state"))
            else:
                link_or_copy(staged, latest)
        self.run_state.latest_checkpoint = str(latest)
        self.run_state.step = step
        write_run_state(self.data_path, self.run_state)

    @property
    def upload_failures(self) -> List[str]:
        """One message per upload that failed after all its attempts (training went on)."""
        return list(self.uploader.failures)

    def wait_for_uploads(self) -> None:
        """Block until background uploads are done (each succeeded or was reported)."""
        self.uploader.wait()

    # --- end -----------------------------------------------------------------------------------

    def finish(self, success: bool = True, *, interrupted: bool = False) -> None:
        """Wait for uploads, mark the run finished (when `success`), close the logger. Idempotent.

        `interrupted`: the run stopped cleanly before its end (a signal); it stays resumable.
        """
        if self._finished:
            return
        self._finished = True
        try:
            self.uploader.close()
        finally:
            try:
                if success and not interrupted:
                    self.run_state.finished = True
                    write_run_state(self.data_path, self.run_state)
                # no save is in progress now: whatever staging is left is a killed save's
                clean_staging(self.data_path, local_destinations(self.config, self.data_path))
            finally:
                try:
                    self.logger.finish(success)
                finally:
                    if self._restore_argv is not None:
                        sys.argv = self._restore_argv

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.finish(success=exc_type is None)
