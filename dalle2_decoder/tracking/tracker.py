"""The tracker: one object that logs, loads the start checkpoint and saves, built once at setup.

`create_tracker` returns a `Tracker` on the main process and a `NullTracker` (same methods, does
nothing) on every other process, so the training loop calls the same methods on every rank and
never asks which rank it is. See docs/TRACKING.md for the protocol the trainer follows.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..common.files import atomic_write_text
from ..config.tracker import (
    HuggingfaceSaveConfig,
    LocalLoadConfig,
    LocalSaveConfig,
    TensorboardLogConfig,
    TrackerConfig,
    UnetSourcesLoadConfig,
    UrlLoadConfig,
    WandbLoadConfig,
    WandbLogConfig,
    WandbSaveConfig,
    saves_something,
    tracker_problems,
)
from ..failures import EXIT_IO
from .checkpoint import LoadedCheckpoint, read_file, save_checkpoint, save_model
from .loaders import LoadError, LocalLoader, PartsLoader, UrlLoader, WandbLoader
from .loggers import ConsoleLogger, ImagesLike, TensorboardLogger, WandbLogger, generate_run_id, to_uint8_images
from .redact import OUTPUT, install_output_redaction, redact, scrub_strings, secrets_in
from .run_state import (
    RUN_CONFIG_FILE,
    SUMMARY_FILE,
    RunState,
    clean_staging,
    prepare_data_path,
    read_run_state,
    write_run_state,
)
from .savers import HuggingfaceSaver, LocalSaver, SaveFile, Uploader, WandbSaver, link_or_copy, resolve_hub_token
from .sharded import ShardedCheckpoint, is_sharded_folder, place_folder, remove_save

StateSource = Union[Mapping[str, Any], Callable[[], Mapping[str, Any]], None]
"""A state dict, or a function returning one (called only when some saver needs it)."""

Broadcast = Callable[[List[Any]], Any]
"""Broadcasts a one-element list in place from the main process, e.g. accelerate's `broadcast_object_list`."""

RESUME_CHECKPOINT = Path("resume") / "latest_checkpoint.pt"
RESUME_SHARDED = Path("resume") / "latest_checkpoint"
"""A sharded run's kept checkpoint: a link to its folder (see `tracking.sharded`)."""


class TrackerSetupError(ValueError):
    """The tracker configuration cannot work; lists every problem found."""

    exit_status: ClassVar[int] = EXIT_IO

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("tracker configuration problems:\n" + "\n".join(f"  - {problem}" for problem in problems))


class NullTracker:
    """The tracker of every process but the main one: the same methods, doing nothing.

    `load(broadcast=...)` still takes part in the broadcast, so every rank reaches it.
    """

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

    def save(
        self,
        *,
        step: int,
        checkpoint_state: StateSource = None,
        model_state: StateSource = None,
        is_best: bool = False,
        fields: Optional[Mapping[str, Any]] = None,
    ) -> None:
        pass

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


def save_path_fields(step: int, fields: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Values for the `{epoch}`-style fields of save paths; what the caller does not give has a neutral value."""
    values: Dict[str, Any] = {
        "epoch": 0,
        "sample": 0,
        "next_task": "train",
        "validation_losses": [],
        "samples_seen": step,
    }
    values.update(fields or {})
    return values


def _evaluate(source: StateSource, name: str) -> Mapping[str, Any]:
    if source is None:
        raise ValueError(f"a saver needs {name}, but save() was called without it")
    return source() if callable(source) else source


class Tracker:
    """The main process's tracker. Build it with `create_tracker`."""

    def __init__(
        self,
        config: TrackerConfig,
        *,
        data_path: Path,
        logger: Union[ConsoleLogger, WandbLogger],
        loader: Union[LocalLoader, UrlLoader, WandbLoader, None],
        savers: List[Union[LocalSaver, HuggingfaceSaver, WandbSaver]],
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
        """The checkpoint to start from, or None to start fresh.

        An interrupted run's latest local checkpoint wins (auto-resume); otherwise the configured
        loader, unless it is `only_auto_resume` and this run is not being auto-resumed. With
        `broadcast`, the result is sent to every process (each calls `load(broadcast)`).
        """
        loaded = self._load()
        if broadcast is not None:
            sent: List[Any] = [loaded]
            broadcast(sent)
        return loaded

    def _load(self) -> Optional[LoadedCheckpoint]:
        if self.auto_resuming and self.run_state.latest_checkpoint:
            path = Path(self.run_state.latest_checkpoint)
            if not (path.is_file() or is_sharded_folder(path)):
                raise LoadError(
                    f"the interrupted run in {self.data_path} records its latest checkpoint at {path}, which is "
                    "missing; restore that file, or delete run_state.json there to start over"
                )
            self.info(f"auto-resume: loading the interrupted run's latest checkpoint {path}")
            return dataclasses.replace(read_file(path), source=f"auto-resume {path}", auto_resumed=True)
        if self.loader is None:
            return None
        if self.loader.config.only_auto_resume and not self.auto_resuming:
            self.info(
                f"tracker.load ({self.loader.describe()}) is only_auto_resume and this run is new: starting fresh"
            )
            return None
        self.info(f"loading the start checkpoint from {self.loader.describe()}")
        if isinstance(self.loader, PartsLoader):
            return self._load_parts(self.loader)
        path = self.loader.fetch()
        loaded = dataclasses.replace(read_file(path), source=self.loader.describe(), auto_resumed=self.auto_resuming)
        self._check_release(loaded)
        return loaded

    def _check_release(self, loaded: LoadedCheckpoint) -> None:
        """A file of an earlier DALLE2-pytorch release needs the run's U-Nets configured as that release's."""
        from types import SimpleNamespace

        from .checkpoint import CheckpointError
        from .reference import release_mismatch

        decoder = self.config_dict.get("decoder") if isinstance(self.config_dict, Mapping) else None
        unets = decoder.get("unets") if isinstance(decoder, Mapping) else None
        if not isinstance(unets, list):
            return
        built = [
            SimpleNamespace(reference_release=u.get("reference_release") if isinstance(u, Mapping) else None)
            for u in unets
        ]
        problem = release_mismatch(built, loaded.reference_release, loaded.source)
        if problem:
            raise CheckpointError(problem)

    def _load_parts(self, loader: "PartsLoader") -> LoadedCheckpoint:
        """A decoder assembled from the U-Nets of several files, checked against this run's decoder."""
        from ..config.root import TrainDecoderConfig
        from .parts import UnetPart, assemble

        parts = []
        for source, part_loader in zip(loader.config.unet_sources, loader.loaders):
            loaded = dataclasses.replace(read_file(part_loader.fetch()), source=part_loader.describe())
            numbers = source.file_unet_numbers or [None] * len(source.unet_numbers)
            parts += [UnetPart(slot, loaded, number) for slot, number in zip(source.unet_numbers, numbers)]
        config = TrainDecoderConfig.from_dict(self.config_dict)
        _, state = assemble(config, parts, use_ema=loader.config.use_ema, slots_built_as_configured=True)
        notes = tuple(note for part in parts for note in part.loaded.notes)
        return LoadedCheckpoint(
            "model", 0, None, model_state=state, source=loader.describe(), auto_resumed=self.auto_resuming, notes=notes
        )

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
        staging = sharded.staging if sharded else self.data_path / ".staging" / f"step_{step}-{uuid.uuid4().hex[:8]}"
        artifacts: Dict[Tuple[str, str], Path] = {}

        def artifact(kind: str, suffix: str) -> Path:
            if (kind, suffix) not in artifacts:
                if kind == "checkpoint" and sharded is not None:
                    path = sharded.write(self._scrubbed_payload(step))
                elif kind == "checkpoint":
                    state = scrub_strings(_evaluate(checkpoint_state, "checkpoint_state"), self.known_secrets)
                    path = save_checkpoint(
                        staging / f"checkpoint{suffix}", state, step=step, config_json=self.config_json
                    )
                else:
                    state = _evaluate(model_state, "model_state")
                    path = save_model(staging / f"model{suffix}", state, step=step, config_json=self.config_json)
                artifacts[(kind, suffix)] = path
            return artifacts[(kind, suffix)]

        meta_files: List[Path] = []

        def metadata() -> List[Path]:
            if not meta_files:
                folder = staging / "meta"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "config.json").write_text(json.dumps(self.config_dict, indent=2) + "\n")
                (folder / "run_metadata.json").write_text(json.dumps(self._metadata(step, is_best), indent=2) + "\n")
                meta_files.extend([folder / "config.json", folder / "run_metadata.json"])
            return meta_files

        try:
            plans = []
            for saver in self.savers:
                files = []
                targets = [saver.config.save_latest_to] + ([saver.config.save_best_to] if is_best else [])
                for dest in filter(None, targets):
                    suffix = ".safetensors" if dest.endswith(".safetensors") else ".pt"
                    files.append(SaveFile(artifact(saver.config.save_type, suffix), dest.format(**fields)))
                if saver.config.save_meta_to:
                    folder = saver.config.save_meta_to.rstrip("/")
                    files.extend(SaveFile(local, f"{folder}/{local.name}") for local in metadata())
                if files:
                    plans.append((saver, files))

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
            self._record_resume_point(step, artifacts, checkpoint_state, fields)
            if any(isinstance(saver, LocalSaver) and saver.config.keep_last for saver in self.savers):
                write_run_state(self.data_path, self.run_state)  # what was written, before anything goes
                if old_saves:
                    self._delete_old_saves(old_saves, keep=written)
                    write_run_state(self.data_path, self.run_state)  # and what is left

            for saver, files in plans:
                if saver.remote:
                    self._submit_upload(saver, files, step)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

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

    def _scrubbed_payload(self, step: int) -> Callable[[Path], Path]:
        """Writes a sharded checkpoint's `checkpoint.pt` as a checkpoint file is written."""

        def write(path: Path, state: Mapping[str, Any]) -> Path:
            return save_checkpoint(
                path, scrub_strings(state, self.known_secrets), step=step, config_json=self.config_json
            )

        return write

    def _submit_upload(self, saver, files: List[SaveFile], step: int) -> None:
        """Hand an upload to the uploader with its own links to the files.

        On success the links go; on failure the files move to `uploads/<saver>/failed/<dest>`,
        replacing an older failed copy of the same destination (one kept copy per destination, so
        a long outage does not fill the disk), and a later successful upload of it removes that.
        """
        folder = self.data_path / "uploads" / f"saver{self.savers.index(saver)}-{type(saver).__name__}"
        pending = folder / "pending" / f"step_{step}-{uuid.uuid4().hex[:8]}"
        failed = folder / "failed"
        kept = [SaveFile(link_or_copy(file.local, pending / file.dest.lstrip("/")), file.dest) for file in files]

        def on_success() -> None:
            shutil.rmtree(pending, ignore_errors=True)
            for file in kept:
                (failed / file.dest.lstrip("/")).unlink(missing_ok=True)

        def on_failure() -> List[Path]:
            paths = []
            for file in kept:
                target = failed / file.dest.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(file.local, target)
                paths.append(target)
            shutil.rmtree(pending, ignore_errors=True)
            return paths

        self.uploader.submit(saver, kept, step, on_success=on_success, on_failure=on_failure)

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
            checkpoint_state.write(self._scrubbed_payload(step))
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
                state = scrub_strings(_evaluate(checkpoint_state, "checkpoint_state"), self.known_secrets)
                save_checkpoint(latest, state, step=step, config_json=self.config_json)
            else:
                link_or_copy(staged, latest)
        self.run_state.latest_checkpoint = str(latest)
        self.run_state.step = step
        write_run_state(self.data_path, self.run_state)

    def _metadata(self, step: int, is_best: bool) -> Dict[str, Any]:
        import torch

        from .._version import __version__

        return {
            "run_id": self.run_state.run_id,
            "wandb_run_path": self.run_state.wandb_run_path,
            "step": step,
            "is_best": is_best,
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "started_at": datetime.datetime.fromtimestamp(self.run_state.started_at, datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "attempts": self.run_state.attempts,
            "host": socket.gethostname(),
            "versions": {
                "dalle2_decoder": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }

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


# --- construction --------------------------------------------------------------------------------


def _wandb_offline() -> bool:
    return os.environ.get("WANDB_MODE", "") in ("offline", "dryrun", "disabled")


def _check_config(config: TrackerConfig, auto_resuming: bool) -> List[str]:
    """Problems that can be found without touching anything.

    The configuration's own checks (`config.tracker.tracker_problems`, which config loading
    reports too), then what depends on this run and machine: the environment, whether a run is
    being resumed, the start checkpoint's file.
    """
    problems = tracker_problems(config)
    log = config.log
    is_wandb = isinstance(log, WandbLogConfig)
    for index, save in enumerate(config.save):
        if isinstance(save, WandbSaveConfig) and save.wandb_run_path is not None and _wandb_offline():
            problems.append(
                f"tracker.save[{index}] ({save.save_to}): saving to another run (wandb_run_path) needs wandb online, "
                "but WANDB_MODE is offline"
            )
    load = config.load
    if load is not None and not (load.only_auto_resume and not auto_resuming):
        if isinstance(load, WandbLoadConfig) and load.wandb_run_path is None and is_wandb:
            # without wandb logging, tracker_problems has said so already
            if not (log.resume or auto_resuming):
                problems.append(
                    "tracker.load (wandb): wandb_run_path is not set and no wandb run is being resumed; set "
                    "wandb_run_path to 'entity/project/run_id', or resume a wandb run (tracker.log resume or "
                    "auto_resume)"
                )
        elif isinstance(load, LocalLoadConfig):
            try:
                LocalLoader(load).check()
            except LoadError as error:
                problems.append(str(error))
        elif isinstance(load, UrlLoadConfig):
            try:
                UrlLoader(load, Path(".")).check()
            except LoadError as error:
                problems.append(str(error))
    return problems


def create_tracker(
    config: TrackerConfig,
    *,
    full_config_dict: Mapping[str, Any],
    is_main_process: bool,
    retry_wait_s: float = 2.0,
    sharded_checkpoints: bool = False,
) -> Union[Tracker, NullTracker]:
    """Build the tracker for this process: a `Tracker` on the main process, a `NullTracker` elsewhere.

    `full_config_dict` is the whole run config as plain JSON data; it is logged and saved with
    secrets masked. Every problem with the tracker config (or a missing start checkpoint) is raised
    here, before training starts. `retry_wait_s` is the wait before the first upload retry (doubling after).
    `sharded_checkpoints`: the run saves sharded checkpoints (folders), which only local savers take.
    """
    if not is_main_process:
        return NullTracker()

    data_path = Path(config.data_path).expanduser().resolve()
    log = config.log
    previous = read_run_state(data_path) if log.auto_resume else None
    auto_resuming = previous is not None and not previous.finished

    problems = _check_config(config, auto_resuming)
    if sharded_checkpoints:
        problems += sharded_checkpoint_problems(config)
    hub_tokens: Dict[int, str] = {}
    for index, save in enumerate(config.save):
        if isinstance(save, HuggingfaceSaveConfig) and saves_something(save):
            try:
                token = resolve_hub_token(save)
            except Exception as error:
                problems.append(str(error))
                continue
            if token is None:
                problems.append(
                    f"tracker.save[{index}] (huggingface): no hub token; log in with `hf auth login`, set HF_TOKEN, "
                    "or point token_path to a file holding the token"
                )
            else:
                hub_tokens[index] = token
    if problems:
        raise TrackerSetupError(problems)

    # One redaction for everything printed, logged, saved or uploaded from here on.
    config_secrets = secrets_in(dict(full_config_dict))
    install_output_redaction(config_secrets + list(hub_tokens.values()))
    config_dict = redact(dict(full_config_dict), known_secrets=config_secrets + list(hub_tokens.values()))
    resumed = prepare_data_path(
        data_path,
        overwrite=config.overwrite_data_path,
        auto_resume=log.auto_resume,
        protected=protected_paths(config, full_config_dict, data_path),
        say=lambda text: print(OUTPUT.text(text), flush=True),
    )
    stray = clean_staging(data_path, local_destinations(config, data_path))
    if stray:
        print(
            f"removed {len(stray)} unfinished save(s) left in {data_path} by a process that was stopped mid-save",
            flush=True,
        )
    now = time.time()
    if resumed is not None:
        run_state = dataclasses.replace(resumed, attempts=resumed.attempts + 1)
        print(
            f"auto-resume: continuing run {run_state.run_id} in {data_path} (attempt {run_state.attempts})", flush=True
        )
    else:
        run_state = RunState(run_id=generate_run_id(), started_at=now)

    logger: Union[ConsoleLogger, WandbLogger]
    if isinstance(log, WandbLogConfig):
        if resumed is not None:
            run_id, resume = resumed.run_id, "allow"
        elif log.resume:
            run_id, resume = log.wandb_run_id, "must"
        else:
            run_id, resume = log.wandb_run_id or run_state.run_id, None
        wandb_dir = None if os.environ.get("WANDB_DIR") else data_path
        # wandb records the command line; a secret given there (e.g. `--set ...token=...`) is masked
        restore_argv = sys.argv
        sys.argv = [OUTPUT.text(arg) for arg in sys.argv]
        logger = WandbLogger(
            entity=log.wandb_entity,
            project=log.wandb_project,
            run_name=log.wandb_run_name,
            run_id=run_id,
            resume=resume,
            config=config_dict,
            wandb_dir=wandb_dir,
        )
        run_state.run_id = logger.run_id
        run_state.wandb_run_path = logger.run_path
    elif isinstance(log, TensorboardLogConfig):
        restore_argv = None
        # resumed: what the interrupted run logged after its checkpoint is discarded by TensorBoard
        logger = TensorboardLogger(data_path, purge_step=resumed.step if resumed is not None else None)
        logger.log_config(config_dict, step=run_state.step)
    else:
        restore_argv = None
        logger = ConsoleLogger(data_path)

    try:
        write_run_state(data_path, run_state)
        atomic_write_text(data_path / RUN_CONFIG_FILE, json.dumps(config_dict, indent=2, default=str) + "\n")
        loader = _create_loader(config, logger, data_path, resuming_wandb=resumed is not None or log.resume)
        savers = _create_savers(config, logger, data_path, hub_tokens)
    except BaseException:
        logger.finish(success=False)
        if restore_argv is not None:
            sys.argv = restore_argv
        raise
    return Tracker(
        config,
        data_path=data_path,
        logger=logger,
        loader=loader,
        savers=savers,
        uploader=Uploader(config.upload_retries, retry_wait_s),
        run_state=run_state,
        auto_resuming=resumed is not None,
        config_dict=config_dict,
        known_secrets=config_secrets + list(hub_tokens.values()),
        restore_argv=restore_argv,
    )


def _pattern_folder(text: str) -> Path:
    """The folder a shard pattern reads from (`shards/{}.tar` and `shards/part-{}.tar`: `shards`)."""
    if "{" not in text:
        return Path(text)
    head = text.split("{")[0]
    return Path(head) if head.endswith("/") or not head else Path(head).parent


def _local_data_paths(value: Any) -> List[Path]:
    """Local paths inside the data section's URL strings (a shard pattern counts as its folder)."""
    found: List[Path] = []
    if isinstance(value, dict):
        for item in value.values():
            found.extend(_local_data_paths(item))
    elif isinstance(value, (list, tuple)):
        for item in value:
            found.extend(_local_data_paths(item))
    elif isinstance(value, str) and value and "://" not in value[:12] and not value.startswith("pipe:"):
        text = value[len("file:") :] if value.startswith("file:") else value
        if "/" in text or "{" in text:
            found.append(_pattern_folder(text))
    elif isinstance(value, str) and value.startswith("file://"):
        found.append(_pattern_folder(value[len("file://") :]))
    return found


def local_destinations(config: TrackerConfig, data_path: Path) -> List[Path]:
    """The files (and links to sharded checkpoint folders) local savers write (relative paths are under `data_path`)."""
    paths = []
    for save in config.save:
        if isinstance(save, LocalSaveConfig):
            for dest in filter(None, (save.save_latest_to, save.save_best_to)):
                path = Path(dest).expanduser()
                paths.append(path if path.is_absolute() else data_path / path)
    paths.append(data_path / RESUME_CHECKPOINT)
    paths.append(data_path / RESUME_SHARDED)
    return paths


def saves_wanted(config: TrackerConfig, save_type: str, is_best: bool) -> bool:
    """Whether a save (`is_best` or not) writes a `save_type` ("checkpoint" or "model") somewhere: every
    process of a sharded run decides alike, before gathering or writing anything."""
    for save in config.save:
        if save.save_type == save_type and (save.save_latest_to or (is_best and save.save_best_to)):
            return True
    return save_type == "checkpoint" and config.log.auto_resume


def sharded_checkpoint_problems(config: TrackerConfig) -> List[str]:
    """Savers that cannot take a sharded run's checkpoints (folders of per-process shards): remote ones."""
    problems = []
    for index, save in enumerate(config.save):
        if isinstance(save, LocalSaveConfig) or save.save_type != "checkpoint" or not saves_something(save):
            continue
        problems.append(
            f"tracker.save[{index}] ({save.save_to}): a sharded (FSDP) run's checkpoints are folders of per-process "
            f"shards, which this saver does not upload; save them with a local saver (on a filesystem every node "
            f"sees) and use save_type model here (one .safetensors file)"
        )
    return problems


def protected_paths(config: TrackerConfig, full_config_dict: Mapping[str, Any], data_path: Path) -> List[Path]:
    """Files `overwrite_data_path` must never remove: the `tracker.load` file, local saver
    destinations, and what the data section reads (relative paths as the process sees them)."""
    paths: List[Path] = []
    if isinstance(config.load, LocalLoadConfig):
        paths.append(Path(config.load.file_path))
    for save in config.save:
        if isinstance(save, LocalSaveConfig):
            for dest in filter(None, (save.save_latest_to, save.save_best_to, save.save_meta_to)):
                path = Path(dest).expanduser()
                paths.append(path if path.is_absolute() else data_path / path)
    data = full_config_dict.get("data") if isinstance(full_config_dict, Mapping) else None
    paths.extend(_local_data_paths(data or {}))
    return paths


def _create_loader(config: TrackerConfig, logger, data_path: Path, resuming_wandb: bool, load=None):
    load = config.load if load is None else load
    downloads = data_path / "downloads"
    if load is None:
        return None
    if isinstance(load, UnetSourcesLoadConfig):
        parts = [
            _create_loader(config, logger, data_path / f"part{index}", resuming_wandb, source.load_model_from)
            for index, source in enumerate(load.unet_sources)
        ]
        return PartsLoader(load, parts)
    if isinstance(load, LocalLoadConfig):
        return LocalLoader(load)
    if isinstance(load, UrlLoadConfig):
        return UrlLoader(load, downloads)
    roots: List[Path] = []
    if isinstance(logger, WandbLogger):
        roots.append(logger.files_dir.parent.parent)
        offline = logger.offline
        run_path = logger.run_path if resuming_wandb else None
    else:
        offline = _wandb_offline()
        run_path = None
    if os.environ.get("WANDB_DIR"):
        roots.append(Path(os.environ["WANDB_DIR"]) / "wandb")
    roots.append(data_path / "wandb")
    unique_roots = list(dict.fromkeys(path.resolve() for path in roots))
    return WandbLoader(load, run_path=run_path, wandb_roots=unique_roots, offline=offline, download_dir=downloads)


def _create_savers(config: TrackerConfig, logger, data_path: Path, hub_tokens: Dict[int, str]):
    savers = []
    for index, save in enumerate(config.save):
        if not saves_something(save):  # beside savers that save (the config check allows no other case)
            continue
        if isinstance(save, LocalSaveConfig):
            savers.append(LocalSaver(save, data_path))
        elif isinstance(save, HuggingfaceSaveConfig):
            savers.append(HuggingfaceSaver(save, hub_tokens[index]))
        else:
            in_run = isinstance(logger, WandbLogger) and save.wandb_run_path is None
            savers.append(
                WandbSaver(
                    save,
                    run_files_dir=(lambda: logger.files_dir) if in_run else None,
                    save_in_run=logger.run.save if in_run else None,
                )
            )
    return savers
