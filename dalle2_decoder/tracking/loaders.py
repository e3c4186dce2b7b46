"""Loaders: where the checkpoint to start from comes from. Built by `create_tracker` from `tracker.load`.

Each loader has `check()`, run when the tracker is created so that a wrong path or URL fails at
start, and `fetch()`, which returns a local file (downloading it under `data_path/downloads/`).
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import ClassVar, List, Optional

from ..common.files import atomic_write
from ..config.tracker import LocalLoadConfig, UnetSourcesLoadConfig, UrlLoadConfig, WandbLoadConfig
from ..failures import EXIT_CHECKPOINT
from .redact import redact_string


class LoadError(RuntimeError):
    """The configured checkpoint cannot be found or fetched."""

    exit_status: ClassVar[int] = EXIT_CHECKPOINT


class LocalLoader:
    """A checkpoint file on this machine."""

    def __init__(self, config: LocalLoadConfig):
        self.config = config
        self.path = Path(config.file_path).expanduser()

    def describe(self) -> str:
        return f"local file {self.path}"

    def check(self) -> None:
        from .sharded import is_sharded_folder

        if is_sharded_folder(self.path):
            return  # a sharded run's checkpoint folder (or the link to it)
        if self.path.is_dir():
            raise LoadError(
                f"tracker.load.file_path: {self.path} is a folder, not a checkpoint file nor a sharded checkpoint "
                f"folder; name the file in it (e.g. {self.path}/latest.pth)"
            )
        if not self.path.is_file():
            raise LoadError(f"tracker.load.file_path: checkpoint file not found: {self.path}")

    def fetch(self) -> Path:
        self.check()
        return self.path


class UrlLoader:
    """A checkpoint downloaded over http(s), with a progress bar."""

    def __init__(self, config: UrlLoadConfig, download_dir: Path, timeout_s: float = 60.0):
        self.config = config
        self.download_dir = Path(download_dir)
        self.timeout_s = timeout_s
        self.shown_url = redact_string(config.url)
        name = Path(urllib.parse.urlparse(config.url).path).name
        self.file_name = name or "checkpoint.pt"

    def describe(self) -> str:
        return f"url {self.shown_url}"

    def check(self) -> None:
        parsed = urllib.parse.urlparse(self.config.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise LoadError(f"tracker.load.url must be an http:// or https:// URL, got {self.shown_url!r}")

    def fetch(self) -> Path:
        import requests

        from ..common.progress import ProgressOutput

        self.check()
        target = self.download_dir / self.file_name

        def download(temp: Path) -> None:
            with requests.get(self.config.url, stream=True, timeout=(10, self.timeout_s)) as response:
                if response.status_code >= 400:
                    raise LoadError(
                        f"could not download the checkpoint from {self.shown_url}: "
                        f"HTTP {response.status_code} {response.reason} (check tracker.load.url)"
                    )
                total = int(response.headers.get("Content-Length") or 0) or None
                received = 0
                # in MiB: a bar on a terminal, a line every 30 s in a log file
                meter = ProgressOutput().meter(
                    f"downloading {self.file_name}", None if total is None else -(-total // (1 << 20)), unit="MiB"
                )
                shown = 0
                with open(temp, "wb") as handle, meter:
                    for chunk in response.iter_content(chunk_size=1 << 20):
                        handle.write(chunk)
                        received += len(chunk)
                        whole = -(-received // (1 << 20))  # MiB begun, so the last partial one counts
                        meter.update(whole - shown)
                        shown = whole
                if total is not None and received != total:
                    raise LoadError(f"download of {self.shown_url} ended early: {received} of {total} bytes received")

        try:
            atomic_write(target, download)  # a cut download never leaves a partial checkpoint at `target`
        except requests.RequestException as error:
            raise LoadError(
                f"could not download the checkpoint from {self.shown_url}: {redact_string(str(error))}"
            ) from error
        print(f"downloaded {self.shown_url} to {target}", flush=True)
        return target


def _split_run_path(run_path: str) -> List[str]:
    parts = [part for part in run_path.strip("/").split("/") if part and part != "runs"]
    if len(parts) != 3:
        raise LoadError(f"tracker.load.wandb_run_path must be 'entity/project/run_id', got {run_path!r}")
    return parts


class WandbLoader:
    """A file stored in a wandb run: the run given by `wandb_run_path`, or the run being resumed.

    A copy in a local run folder (an offline run, or an online run's local files) is used when
    present; otherwise the file is downloaded with the wandb API.
    """

    def __init__(
        self,
        config: WandbLoadConfig,
        *,
        run_path: Optional[str],
        wandb_roots: List[Path],
        offline: bool,
        download_dir: Path,
    ):
        self.config = config
        self.run_path = config.wandb_run_path or run_path
        self.wandb_roots = wandb_roots
        self.offline = offline
        self.download_dir = Path(download_dir)

    def describe(self) -> str:
        return f"wandb file {self.config.wandb_file_path} of run {self.run_path}"

    def check(self) -> None:
        if self.run_path is None:
            raise LoadError(
                "tracker.load: wandb_run_path is not set and no wandb run is being resumed; set wandb_run_path "
                "to 'entity/project/run_id', or resume a wandb run (tracker.log resume or auto_resume)"
            )
        _split_run_path(self.run_path)

    def _local_copy(self, run_id: str) -> Optional[Path]:
        candidates = []
        for root in self.wandb_roots:
            # `run-<time>-<id>`, and `run-<time>-<id>-<n>` for a restart within the same second
            for pattern in (f"*run-*-{run_id}", f"*run-*-{run_id}-[0-9]*"):
                candidates.extend(root.glob(f"{pattern}/files/{self.config.wandb_file_path}"))
        candidates = [path for path in candidates if path.is_file()]
        return max(candidates, key=lambda path: path.stat().st_mtime) if candidates else None

    def fetch(self) -> Path:
        self.check()
        entity, project, run_id = _split_run_path(self.run_path)
        local = self._local_copy(run_id)
        if local is not None:
            return local
        if self.offline:
            roots = ", ".join(str(root) for root in self.wandb_roots) or "(none)"
            raise LoadError(
                f"wandb is offline and {self.config.wandb_file_path} of run {run_id} is not in a local run folder "
                f"under {roots}; go online or load the file with load_from 'local'"
            )
        import wandb

        target_dir = self.download_dir / "wandb" / run_id
        try:
            remote = wandb.Api().run(f"{entity}/{project}/{run_id}").file(self.config.wandb_file_path)
            remote.download(root=str(target_dir), replace=True)
        except Exception as error:  # wandb raises CommError, ValueError, requests errors
            raise LoadError(f"could not download {self.describe()}: {error}") from error
        path = target_dir / self.config.wandb_file_path
        if not path.is_file():
            raise LoadError(f"{self.describe()} was not found in the run's files")
        return path


class PartsLoader:
    """The files of a decoder assembled from parts (`tracker.load.load_from: unet_sources`): one loader each."""

    def __init__(self, config: UnetSourcesLoadConfig, loaders: List[object]):
        self.config = config
        self.loaders = loaders

    def describe(self) -> str:
        return (
            "unet_sources ("
            + "; ".join(
                f"U-Net(s) {', '.join(map(str, source.unet_numbers))} from {loader.describe()}"
                for source, loader in zip(self.config.unet_sources, self.loaders)
            )
            + ")"
        )

    def check(self) -> None:
        for loader in self.loaders:
            if hasattr(loader, "check"):
                loader.check()
