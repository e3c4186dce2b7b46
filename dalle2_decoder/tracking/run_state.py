"""The run's own record under `data_path`, and the rules for starting in an existing `data_path`.

`data_path/run_state.json` says which run lives there (its wandb run id), where its latest resumable
checkpoint is, and whether it finished. A second process with `auto_resume` reads it to continue
an interrupted run: same wandb run, latest checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

from ..common.files import atomic_write_text
from ..failures import EXIT_IO

RUN_STATE_FILE = "run_state.json"
RUN_CONFIG_FILE = "run_config.json"
"""The run's resolved config (secrets masked), written at setup: what `dalle2_decoder.report` shows."""
SUMMARY_FILE = "summary.txt"
"""The start-up summary the training run printed (processes, data, U-Nets)."""
POSTHOC_EMA_FOLDER = "posthoc_ema"
"""Post-hoc EMA snapshots (`training/posthoc_ema.py`), when `train.posthoc_ema_sigma_rels` is set."""


class DataPathError(RuntimeError):
    """`data_path` cannot be used as configured."""

    exit_status: ClassVar[int] = EXIT_IO


@dataclass
class RunState:
    """What a later process needs to know about the run that used this `data_path`."""

    run_id: str
    """Id of the run; the wandb run id when logging to wandb."""
    wandb_run_path: Optional[str] = None
    """`entity/project/run_id` when logging to wandb."""
    latest_checkpoint: Optional[str] = None
    """Latest resumable checkpoint written locally (absolute path)."""
    step: int = 0
    """Step of the latest checkpoint."""
    finished: bool = False
    """True once the run ended normally (`Tracker.finish()`)."""
    started_at: float = 0.0
    """Unix time the run first started."""
    updated_at: float = 0.0
    """Unix time of the last update."""
    attempts: int = 1
    """Number of processes that ran this run (1 + auto-resumes)."""
    saved_files: Dict[str, List[str]] = field(default_factory=dict)
    """Files written by savers with `keep_last`, oldest first, per saver (`save[i] <save_latest_to>`):
    the only files retention may delete."""
    best_files: List[str] = field(default_factory=list)
    """Every best save written locally (absolute paths): never deleted by retention."""


def read_run_state(data_path: Path) -> Optional[RunState]:
    """The run state stored in `data_path`, or None when there is none.

    A run_state.json that exists but cannot be read is an error, not "no run": treating it as
    absent would start a fresh run over (and with `overwrite_data_path`, clear) an interrupted one.
    """
    path = Path(data_path) / RUN_STATE_FILE
    if not path.exists():
        return None
    how = (
        f"it records the run in {Path(data_path)}; restore it (its latest checkpoint is usually "
        "latest.pth or resume/latest_checkpoint.pt there), or delete it to treat the folder as not holding a run"
    )
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataPathError(f"{path} cannot be read ({error}); {how}") from error
    known = {field.name for field in fields(RunState)}
    if not isinstance(raw, dict) or not isinstance(raw.get("run_id"), str):
        raise DataPathError(f"{path} is not a run state (no run_id); {how}")
    try:
        return RunState(**{key: value for key, value in raw.items() if key in known})
    except TypeError as error:
        raise DataPathError(f"{path} is not a run state ({error}); {how}") from error


def write_run_state(data_path: Path, state: RunState) -> None:
    """Atomically replace `data_path/run_state.json` (data on disk before the rename, and the rename itself)."""
    state.updated_at = time.time()
    path = Path(data_path) / RUN_STATE_FILE
    atomic_write_text(path, json.dumps(asdict(state), indent=2) + "\n")


def protected_folder_reason(path: Path) -> Optional[str]:
    """Why the resolved folder `path` must never be cleared (a filesystem root, the home directory,
    the current directory or one of its parents), or None when it may be."""
    cwd = Path.cwd().resolve()
    if path == Path(path.anchor):
        return "it is a filesystem root"
    if path == Path.home().resolve():
        return "it is the home directory"
    if path == cwd or path in cwd.parents:
        return "it is the current directory or one of its parents"
    return None


TRACKER_ENTRIES = (
    "run_state.json",
    "metrics.jsonl",
    "samples",
    ".staging",
    "uploads",
    "downloads",
    "resume",
    "wandb",
    "tensorboard",
    RUN_CONFIG_FILE,
    SUMMARY_FILE,
    POSTHOC_EMA_FOLDER,
)
"""What the tracker itself writes directly under `data_path`: all that `overwrite_data_path` removes."""


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def overwrite_plan(data_path: Path, protected: Sequence[Path] = ()) -> Tuple[List[Path], List[Path]]:
    """What `overwrite_data_path` removes from `data_path`, and the tracker entries it keeps.

    Only the tracker's own entries (`TRACKER_ENTRIES`, and leftovers of its temporary files) are
    removed; an entry holding a `protected` path (the file `tracker.load` names, a saver's
    destination, the data the config reads) is kept whole. Everything else in the folder is the
    user's and is never touched.
    """
    path = Path(data_path)
    protected = [Path(item).expanduser().resolve() for item in protected]
    remove, keep = [], []
    for child in sorted(path.iterdir()) if path.is_dir() else []:
        ours = child.name in TRACKER_ENTRIES or child.name.startswith(f".{RUN_STATE_FILE}.")
        if not ours:
            continue
        resolved = child.resolve() if not child.is_symlink() else child.absolute()
        (keep if any(_inside(item, resolved) for item in protected) else remove).append(child)
    return remove, keep


def _name_pattern(name: str) -> str:
    """A glob pattern of the file names a save path's last part stands for: each `{field}` of a
    templated save (`latest_{epoch:03d}.pth`) matches anything, every other character itself."""
    import glob
    import string

    try:
        parts = list(string.Formatter().parse(name))
    except ValueError:
        return glob.escape(name)
    return "".join(glob.escape(literal) + ("*" if field is not None else "") for literal, field, _, _ in parts)


def clean_staging(data_path: Path, destinations: Sequence[Path] = ()) -> List[Path]:
    """Remove what a killed process left half-done: staging folders of saves, pending uploads, and
    the temporary files beside local save `destinations` (`.<name>.<pid>-<id>.tmp`).

    Call only while no save of this run is in progress (at setup and at the end of a run). Returns
    what was removed. Failed uploads (`uploads/*/failed/`) are kept: they are the only copies.
    """
    path = Path(data_path)
    stray = sorted((path / ".staging").glob("step_*")) + sorted(path.glob("uploads/*/pending/step_*"))
    stray += sorted(path.glob(f".{RUN_STATE_FILE}.*.tmp"))
    for destination in destinations:
        stray += sorted(Path(destination).parent.glob(f".{_name_pattern(Path(destination).name)}.*-*.tmp"))
    from .sharded import remove_unlinked_versions

    for destination in destinations:
        # Sharded checkpoints: folder versions that their link no longer (or never) named.
        stray += remove_unlinked_versions(Path(destination))
    for item in stray:
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
    return stray


def prepare_data_path(
    data_path: Path,
    *,
    overwrite: bool,
    auto_resume: bool,
    protected: Sequence[Path] = (),
    say: Callable[[str], None] = print,
) -> Optional[RunState]:
    """Make `data_path` ready for this run; return the interrupted run's state when auto-resuming it.

    - auto_resume and `data_path` holds an unfinished run: keep everything, return its state;
    - `data_path` missing or empty: create it;
    - otherwise, with `overwrite`: remove the tracker's own entries (see `overwrite_plan`; never a
      `protected` path), saying what; without: raise DataPathError saying how to go on.
    An unreadable run_state.json raises DataPathError (see `read_run_state`).
    """
    path = Path(data_path).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise DataPathError(f"tracker.data_path {path} exists and is not a folder")
    previous = read_run_state(path)
    if auto_resume and previous is not None and not previous.finished:
        return previous
    if path.is_dir() and any(path.iterdir()):
        if overwrite:
            reason = protected_folder_reason(path)
            if reason:
                raise DataPathError(f"tracker.overwrite_data_path is set but {path} is not cleared: {reason}")
            remove, keep = overwrite_plan(path, protected)
            if remove:
                say(
                    "tracker.overwrite_data_path: removing the previous run's "
                    f"{', '.join(item.name for item in remove)} from {path}"
                )
            if keep:
                say(
                    f"tracker.overwrite_data_path: keeping {', '.join(item.name for item in keep)} "
                    "(they hold files the config reads or names)"
                )
            for child in remove:
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        else:
            if previous is not None and not previous.finished:
                found = f"holds the interrupted run {previous.run_id} (step {previous.step})"
                how = "set tracker.log.auto_resume to true to continue it, "
            elif previous is not None:
                found = f"holds the finished run {previous.run_id}"
                how = ""
            else:
                found = "is not empty"
                how = ""
            raise DataPathError(
                f"tracker.data_path {path} {found}. To go on, {how}delete the folder yourself, "
                "choose another tracker.data_path, or set tracker.overwrite_data_path to true to start a fresh "
                "run there (it removes the tracker's own files of the previous run, nothing else)"
            )
    path.mkdir(parents=True, exist_ok=True)
    return None
