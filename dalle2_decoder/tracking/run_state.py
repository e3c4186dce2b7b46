"""The run's own record under `data_path`, and the rules for starting in an existing `data_path`.

`data_path/run_state.json` says which run lives there (its wandb run id), where its latest resumable
checkpoint is, and whether it finished. A second process with `auto_resume` reads it to continue
an interrupted run: same wandb run, latest checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

RUN_STATE_FILE = "run_state.json"


class DataPathError(RuntimeError):
    """`data_path` cannot be used as configured."""


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


def read_run_state(data_path: Path) -> Optional[RunState]:
    """The run state stored in `data_path`, or None when there is none (or it is unreadable)."""
    path = Path(data_path) / RUN_STATE_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    known = {field.name for field in fields(RunState)}
    if not isinstance(raw, dict) or "run_id" not in raw:
        return None
    return RunState(**{key: value for key, value in raw.items() if key in known})


def write_run_state(data_path: Path, state: RunState) -> None:
    """Atomically replace `data_path/run_state.json`."""
    state.updated_at = time.time()
    path = Path(data_path) / RUN_STATE_FILE
    temp = path.with_name(f".{RUN_STATE_FILE}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(asdict(state), indent=2) + "\n")
    os.replace(temp, path)


def _refuse_to_delete(path: Path) -> Optional[str]:
    cwd = Path.cwd().resolve()
    if path == Path(path.anchor):
        return "it is a filesystem root"
    if path == Path.home().resolve():
        return "it is the home directory"
    if path == cwd or path in cwd.parents:
        return "it is the current directory or one of its parents"
    return None


def prepare_data_path(data_path: Path, *, overwrite: bool, auto_resume: bool) -> Optional[RunState]:
    """Make `data_path` ready for this run; return the interrupted run's state when auto-resuming it.

    - auto_resume and `data_path` holds an unfinished run: keep everything, return its state;
    - `data_path` missing or empty: create it;
    - otherwise, with `overwrite`: delete its content; without: raise DataPathError saying how to go on.
    """
    path = Path(data_path).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise DataPathError(f"tracker.data_path {path} exists and is not a folder")
    previous = read_run_state(path)
    if auto_resume and previous is not None and not previous.finished:
        return previous
    if path.is_dir() and any(path.iterdir()):
        if overwrite:
            reason = _refuse_to_delete(path)
            if reason:
                raise DataPathError(f"tracker.overwrite_data_path is set but {path} is not deleted: {reason}")
            for child in path.iterdir():
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
                "choose another tracker.data_path, or set tracker.overwrite_data_path to true to delete its content"
            )
    path.mkdir(parents=True, exist_ok=True)
    return None
