"""`keep_last`: a templated local save keeps its newest files or sharded folders, and deletes nothing
else, even when killed.

Real files throughout: checkpoints written by the tracker, a file of an earlier run and a user's
file in the same folder, the `tracker.load` file, best saves; and real SIGKILLs of the saving
process, while it places a new file and while it deletes old ones.
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dalle2_decoder.config import ConsoleLogConfig, LocalLoadConfig, LocalSaveConfig, TrackerConfig
from dalle2_decoder.tracking import create_tracker, read_file, read_run_state, save_checkpoint

from .conftest import REPO_ROOT

PATTERN = "latest_{samples_seen:03d}.pth"
"""In a folder of its own outside `tracker.data_path` (which must be empty at a run's start)."""


def names(folder: Path):
    return sorted(path.name for path in folder.iterdir())


def steps_in(folder: Path):
    """{file name: the step it holds}, reading each file whole (a cut file would not load)."""
    return {path.name: read_file(path).step for path in folder.glob("*.pth")}


def tracker(run: Path, keep_last: int, load: Path = None):
    """Saves into `run/../kept/`."""
    pattern = str(run.parent / "kept" / PATTERN)
    config = TrackerConfig(
        log=ConsoleLogConfig(log_type="console", auto_resume=True),
        data_path=str(run),
        load=None if load is None else LocalLoadConfig(load_from="local", file_path=str(load)),
        save=[
            LocalSaveConfig(save_to="local", save_latest_to=pattern, keep_last=keep_last),
            # a best save that lands where retention looks: the same folder, a name of the same shape
            LocalSaveConfig(save_to="local", save_best_to=pattern),
        ],
    )
    return create_tracker(config, full_config_dict={}, is_main_process=True)


def earlier_files(kept: Path):
    """Files in the kept folder that this run did not write: an earlier run's save and a user's notes."""
    kept.mkdir(parents=True)
    save_checkpoint(kept / "latest_000.pth", {"w": torch.zeros(4)}, step=0)
    (kept / "notes.txt").write_text("mine")


def test_keep_last_keeps_the_newest_files_of_its_saver_and_never_a_best_earlier_or_load_file(tmp_path):
    run, kept = tmp_path / "run", tmp_path / "kept"
    earlier_files(kept)
    first = tracker(run, keep_last=2)
    for step in range(1, 6):
        first.save(step=step, checkpoint_state={"w": torch.full((4,), float(step))}, is_best=step == 2)
    first.finish(interrupted=True)  # stopped, to be resumed
    # the last two, the best (written by the other saver at the same path), the earlier run's file
    kept_steps = {"latest_000.pth": 0, "latest_002.pth": 2, "latest_004.pth": 4, "latest_005.pth": 5}
    assert steps_in(kept) == kept_steps
    assert (kept / "notes.txt").read_text() == "mine"
    # the run state lists what retention owns now, and nothing it deleted or never owned
    (owned,) = read_run_state(run).saved_files.values()
    assert owned == [str(kept / "latest_004.pth"), str(kept / "latest_005.pth")]

    # the run restarted from one of its own kept files, named by tracker.load: that file stays too,
    # though retention wrote it and it is now beyond the last two
    second = tracker(run, keep_last=2, load=kept / "latest_004.pth")
    assert second.load().step == 5  # auto-resumed from the newest save; the load file is named all the same
    for step in (6, 7, 8):
        second.save(step=step, checkpoint_state={"w": torch.full((4,), float(step))})
    second.finish()
    assert names(kept) == [
        "latest_000.pth",
        "latest_002.pth",
        "latest_004.pth",
        "latest_007.pth",
        "latest_008.pth",
        "notes.txt",
    ]


# --- kills during saving -------------------------------------------------------------------------

SAVE_SCRIPT = textwrap.dedent(
    """
    import os, pathlib, shutil, signal, sys
    import torch
    from dalle2_decoder.config import ConsoleLogConfig, LocalSaveConfig, TrackerConfig
    from dalle2_decoder.tracking import create_tracker

    data_path, kept, step, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

    if mode == "kill-placing":
        def half_then_killed(source, target, *args, **kwargs):
            # the placement of the new file is cut by a SIGKILL after half of its bytes
            data = open(source, "rb").read()
            with open(target, "wb") as handle:
                handle.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

        os.link = half_then_killed
        shutil.copyfile = half_then_killed
    elif mode.startswith("kill-deleting-"):
        # a SIGKILL just before the n-th deletion of an old save (0: before any)
        before = int(mode.rsplit("-", 1)[1])
        unlink = pathlib.Path.unlink
        deleted = []

        def killed_before_a_deletion(self, *args, **kwargs):
            if self.name.startswith("latest_"):
                if len(deleted) == before:
                    os.kill(os.getpid(), signal.SIGKILL)
                deleted.append(self)
            return unlink(self, *args, **kwargs)

        pathlib.Path.unlink = killed_before_a_deletion

    config = TrackerConfig(
        log=ConsoleLogConfig(log_type="console", auto_resume=True),
        data_path=data_path,
        save=[
            LocalSaveConfig(save_to="local", save_latest_to=kept + "/latest_{samples_seen:03d}.pth", keep_last=1),
            LocalSaveConfig(save_to="local", save_best_to=kept + "/latest_{samples_seen:03d}.pth"),
        ],
    )
    tracker = create_tracker(config, full_config_dict={}, is_main_process=True)
    loaded = tracker.load()
    print("LOADED", loaded.step if loaded else None, flush=True)
    tracker.save(step=step, checkpoint_state={"w": torch.full((20000,), float(step))}, is_best=step == 2)
    tracker.finish(interrupted=True)  # stopped after this save: the next process resumes the run
    print("SAVED", step, flush=True)
    """
)


@pytest.mark.slow
def test_keep_last_under_kill_9_never_leaves_fewer_than_the_last_good_file_nor_deletes_another(tmp_path):
    script = tmp_path / "save.py"
    script.write_text(SAVE_SCRIPT)
    run, kept = tmp_path / "run", tmp_path / "kept"
    earlier_files(kept)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}

    def save(step, mode="clean"):
        result = subprocess.run(
            [sys.executable, str(script), str(run), str(kept), str(step), mode],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        if mode == "clean":
            assert result.returncode == 0 and f"SAVED {step}" in result.stdout, result.stderr[-3000:]
        else:  # the kill came where it was meant to (a changed code path would let the save finish)
            assert result.returncode == -signal.SIGKILL and "SAVED" not in result.stdout, result.stderr[-3000:]
        return result

    for step in (1, 2, 3):
        save(step)
    # keep_last 1: the newest, and the best (step 2) which retention never deletes
    assert steps_in(kept) == {"latest_000.pth": 0, "latest_002.pth": 2, "latest_003.pth": 3}

    # killed while placing the new file: it is not there under its name, and nothing was deleted
    save(4, "kill-placing")
    assert steps_in(kept) == {"latest_000.pth": 0, "latest_002.pth": 2, "latest_003.pth": 3}

    # killed after the new file is whole, before deleting the one it replaces: both are there
    assert "LOADED 3" in save(4, "kill-deleting-0").stdout
    assert steps_in(kept) == {"latest_000.pth": 0, "latest_002.pth": 2, "latest_003.pth": 3, "latest_004.pth": 4}

    # the next save deletes what that one left (3 and 4 are now both older than its own); killed
    # between those two deletions: the newest file and every file retention does not own stay
    assert "LOADED 4" in save(5, "kill-deleting-1").stdout
    assert steps_in(kept) == {"latest_000.pth": 0, "latest_002.pth": 2, "latest_004.pth": 4, "latest_005.pth": 5}

    # a clean save after all that: exactly the newest, the best, the earlier run's file, the user's file
    assert "LOADED 5" in save(6).stdout
    assert steps_in(kept) == {"latest_000.pth": 0, "latest_002.pth": 2, "latest_006.pth": 6}
    assert names(kept) == ["latest_000.pth", "latest_002.pth", "latest_006.pth", "notes.txt"]
    assert not [path for path in tmp_path.rglob("*") if path.name.endswith(".tmp")]


# --- sharded checkpoints: a link and a folder of shards per save ------------------------------------


def sharded_save(tracker, step: int) -> None:
    """A save as a sharded run makes it: a folder of shard files under the save's staging folder
    (one file here; the tracker only places folders), and the checkpoint state beside them."""
    from dalle2_decoder.tracking.sharded import ShardedCheckpoint

    staging = tracker.staging_folder(step)
    folder = staging / "shards"
    folder.mkdir(parents=True)
    (folder / "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"step %d" % step)
    state = {"w": torch.full((4,), float(step))}
    tracker.save(step=step, checkpoint_state=ShardedCheckpoint(folder=folder, staging=staging, state=lambda: state))


def test_keep_last_removes_a_sharded_save_with_its_folder_even_after_a_crash_between_the_two(tmp_path, monkeypatch):
    """An old sharded save is a link (`latest_003.pth`) to a folder in `.latest_003.pth.versions/`:
    retention removes both. A crash after the link is gone and before the folder is leaves the
    folder; the run state still lists the save, so the next save of the resumed run removes it."""
    from dalle2_decoder.tracking import tracker as tracker_module
    from dalle2_decoder.tracking.sharded import is_sharded_folder

    run, kept = tmp_path / "run", tmp_path / "kept"
    earlier_files(kept)
    first = tracker(run, keep_last=2)
    for step in range(1, 5):
        sharded_save(first, step)
    assert names(kept) == sorted(
        ["latest_000.pth", "notes.txt", "latest_003.pth", "latest_004.pth"]
        + [".latest_003.pth.versions", ".latest_004.pth.versions"]
    )
    for name, step in (("latest_003.pth", 3), ("latest_004.pth", 4)):
        assert (kept / name).is_symlink() and is_sharded_folder(kept / name)
        assert read_file(kept / name / "checkpoint.pt").step == step
        assert len(list((kept / f".{name}.versions").iterdir())) == 1

    def crash_after_the_link(path):
        path.unlink()
        raise RuntimeError("killed between the link and its folder")

    monkeypatch.setattr(tracker_module, "remove_save", crash_after_the_link)
    with pytest.raises(RuntimeError, match="killed"):
        sharded_save(first, 5)
    assert not (kept / "latest_003.pth").exists() and (kept / ".latest_003.pth.versions").is_dir()
    monkeypatch.undo()

    second = tracker(run, keep_last=2)  # the run resumed by a new process (its run state read back)
    sharded_save(second, 6)
    second.finish()
    assert names(kept) == sorted(
        ["latest_000.pth", "notes.txt", "latest_005.pth", "latest_006.pth"]
        + [".latest_005.pth.versions", ".latest_006.pth.versions"]
    )
    assert read_file(kept / "latest_006.pth" / "checkpoint.pt").step == 6
    assert not list(run.glob(".staging/*"))
