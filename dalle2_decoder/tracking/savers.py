"""Savers: where checkpoints, models and metadata go. Built by `create_tracker` from `tracker.save`.

The tracker writes each file once (under `data_path/.staging/`); a saver receives the list of
`SaveFile(local, dest)` for one save and puts them at their destinations:

- `LocalSaver`: atomic hard link (or copy) to `dest` (relative paths are under `data_path`);
- `HuggingfaceSaver`: one commit to a hub repository (created when missing), in the background;
- `WandbSaver`: into the current run's files (wandb uploads them, or `wandb sync` does offline),
  or, with `wandb_run_path`, uploaded to another run with the wandb API in the background.

Remote puts are retried by `Uploader`; a put that keeps failing is reported and training goes on,
with the files kept under `data_path/uploads/`.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, List, Optional, Union

from ..common.files import atomic_write
from ..config.tracker import HuggingfaceSaveConfig, LocalSaveConfig, WandbSaveConfig, resolve_save_path
from ..failures import EXIT_IO
from .hub_card import card_files

logger = logging.getLogger(__name__)


class SaveError(RuntimeError):
    """A saver cannot be set up as configured."""

    exit_status: ClassVar[int] = EXIT_IO


@dataclass(frozen=True)
class SaveFile:
    """One file of a save: where it is on disk and where the saver must put it."""

    local: Path
    dest: str


def link_or_copy(source: Path, target: Path) -> Path:
    """Atomically make `target` hold the content of `source` (hard link when possible, else copy).

    A hard link, not a copy, where the filesystem allows: a save places the same checkpoint (often
    gigabytes) at latest, best and each upload's pending folder, which as copies would cost their
    size in time and disk each; `atomic_write` still makes the placement whole or nothing.
    When `target` is already `source` itself (two savers naming one path), there is nothing to do:
    renaming a second link of the same file over it would do nothing and leave the link behind.
    """
    try:
        if os.path.samefile(source, target):
            return Path(target)
    except OSError:  # no target yet
        pass

    def place(temp: Path) -> None:
        try:
            os.link(source, temp)
        except OSError:  # another filesystem, or one without hard links
            shutil.copyfile(source, temp)

    return atomic_write(target, place)


class LocalSaver:
    """Saves to paths on this machine."""

    background = False
    remote = False

    def __init__(self, config: LocalSaveConfig, data_path: Path):
        self.config = config
        self.data_path = Path(data_path)

    def describe(self) -> str:
        return "local"

    def resolve(self, dest: str) -> Path:
        return resolve_save_path(dest, self.data_path)

    def put(self, files: List[SaveFile], step: int) -> None:
        from .sharded import place_folder

        for file in files:
            if file.local.is_dir():  # a sharded checkpoint: a link to a complete folder, replaced at once
                place_folder(file.local, self.resolve(file.dest))
            else:
                link_or_copy(file.local, self.resolve(file.dest))


def resolve_hub_token(config: HuggingfaceSaveConfig) -> Optional[str]:
    """The hub token: from `token_path` when set, else the hub client's own (HF_TOKEN, then its login)."""
    if config.token_path is not None:
        path = Path(config.token_path).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as error:
            raise SaveError(f"tracker.save (huggingface): cannot read token_path {path}: {error.strerror}") from error
        if not token:
            raise SaveError(f"tracker.save (huggingface): token_path {path} is empty")
        return token
    from huggingface_hub import get_token

    return get_token()


class HuggingfaceSaver:
    """Uploads to a Hugging Face Hub model repository, one commit per save."""

    background = True
    remote = True

    def __init__(self, config: HuggingfaceSaveConfig, token: str):
        from huggingface_hub import HfApi

        self.config = config
        self.api = HfApi(endpoint=config.huggingface_endpoint, token=token)
        self._repo_ready = False

    def describe(self) -> str:
        return f"huggingface repo {self.config.huggingface_repo} at {self.api.endpoint}"

    def put(self, files: List[SaveFile], step: int) -> None:
        from huggingface_hub import CommitOperationAdd

        if not self._repo_ready:
            self.api.create_repo(self.config.huggingface_repo, exist_ok=True)
            self._repo_ready = True
        operations = [CommitOperationAdd(path_in_repo=file.dest, path_or_fileobj=str(file.local)) for file in files]
        # With the weights go a model card and a config.json naming them, so that
        # `dalle2_decoder.load_decoder("user/repo")` finds everything (see tracking/hub_card.py).
        for path_in_repo, content in card_files(self.config, files, step).items():
            operations.append(CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=content))
        self.api.create_commit(
            repo_id=self.config.huggingface_repo,
            operations=operations,
            commit_message=f"dalle2_decoder save at step {step}: " + ", ".join(file.dest for file in files),
        )


class WandbSaver:
    """Saves into the files of the current wandb run, or of the run at `wandb_run_path`."""

    remote = True

    def __init__(
        self, config: WandbSaveConfig, run_files_dir: Optional[Callable[[], Path]], save_in_run: Optional[Callable]
    ):
        self.config = config
        self._files_dir = run_files_dir
        self._save_in_run = save_in_run
        self.background = config.wandb_run_path is not None

    def describe(self) -> str:
        return f"wandb run {self.config.wandb_run_path}" if self.config.wandb_run_path else "wandb (current run)"

    def put(self, files: List[SaveFile], step: int) -> None:
        if self.config.wandb_run_path is None:
            files_dir = self._files_dir()
            for file in files:
                # the file is written inside the run's files folder, so the run holds a real copy
                # (not a link to a file that a later save replaces) and wandb publishes it as is
                target = link_or_copy(file.local, files_dir / file.dest)
                self._save_in_run(str(target), base_path=str(files_dir), policy="now", glob=False)
            return
        import tempfile

        import wandb

        run = wandb.Api().run(self.config.wandb_run_path)
        with tempfile.TemporaryDirectory() as root:
            for file in files:
                staged = link_or_copy(file.local, Path(root) / file.dest)
                run.upload_file(str(staged), root=root)


Saver = Union[LocalSaver, HuggingfaceSaver, WandbSaver]


class Uploader:
    """Runs saver puts: local ones directly, remote ones with retries (background ones in a worker thread).

    A put that fails `attempts` times is logged as an error and dropped: training goes on and the
    files stay where they were staged (reported in the error).
    """

    def __init__(self, attempts: int, wait_s: float):
        self.attempts = max(1, attempts)
        self.wait_s = wait_s
        self.failures: List[str] = []
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pending: List[Future] = []
        self._lock = threading.Lock()

    def submit(
        self,
        saver: Saver,
        files: List[SaveFile],
        step: int,
        on_success: Callable[[], None] = lambda: None,
        on_failure: Optional[Callable[[], List[Path]]] = None,
    ) -> None:
        """Put `files`; `on_success` runs after a put succeeds, `on_failure` (returning where the files
        are kept) after the last failed attempt."""
        if not saver.remote:  # a local write that fails (disk full) is an error of the run itself
            saver.put(files, step)
            on_success()
            return
        if not saver.background:
            self._run(saver, files, step, on_success, on_failure)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracker-upload")
        with self._lock:
            self._pending = [future for future in self._pending if not future.done()]
            self._pending.append(self._executor.submit(self._run, saver, files, step, on_success, on_failure))

    def submit_from_copies(self, saver: Saver, files: List[SaveFile], step: int, folder: Path) -> None:
        """Put `files` from links of their own under `folder`, so the save's staging can go at once.

        On success the links go; on failure the files move to `folder/failed/<dest>`, replacing an
        older failed copy of the same destination (one kept copy per destination, so a long outage
        does not fill the disk), and a later successful upload of it removes that.
        """
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

        self.submit(saver, kept, step, on_success=on_success, on_failure=on_failure)

    def _run(
        self,
        saver: Saver,
        files: List[SaveFile],
        step: int,
        on_success: Callable[[], None],
        on_failure: Optional[Callable[[], List[Path]]],
    ) -> bool:
        for attempt in range(1, self.attempts + 1):
            try:
                saver.put(files, step)
            except Exception as error:  # any failure of a remote service: retry, then report
                message = f"{type(error).__name__}: {error}".splitlines()[0]
                if attempt < self.attempts:
                    wait = self.wait_s * 2 ** (attempt - 1)
                    logger.warning(
                        "save to %s failed (attempt %d of %d), retrying in %.1fs: %s",
                        saver.describe(),
                        attempt,
                        self.attempts,
                        wait,
                        message,
                    )
                    time.sleep(wait)
                    continue
                kept_paths = on_failure() if on_failure is not None else [file.local for file in files]
                kept = ", ".join(str(path) for path in kept_paths)
                report = (
                    f"save to {saver.describe()} at step {step} failed after {self.attempts} attempts ({message}); "
                    f"training goes on, the files are kept at: {kept}"
                )
                logger.error(report)
                self.failures.append(report)
                return False
            on_success()
            return True
        return False

    def wait(self) -> None:
        """Block until every background put has finished (succeeded or been reported)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
