"""A stop signal sent to one rank of a two-process run under `accelerate launch` stops every rank at the
same step; the ranks exit 0, the status torchrun takes for a clean end (any other would be a failure)."""

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dalle2_decoder.tracking import read_file

from .conftest import REPO_ROOT, cpu_launch_command
from .training_fixtures import tiny_config, write_tiny_demo


def rank_pids(launcher_pid: int) -> dict:
    """{rank: pid} of the training processes below the launcher (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent != launcher_pid:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(entry.name)
    return found


@pytest.mark.slow
def test_sigusr1_to_one_rank_stops_both_at_the_same_step(tmp_path, write_config):
    data = write_tiny_demo(tmp_path / "demo")
    data_path = tmp_path / "run"
    config = tiny_config(
        data, data_path, epochs=1000, epoch_samples=400, validation_samples=8, save_every_n_samples=100000
    )
    path = write_config(config)
    command = cpu_launch_command(str(REPO_ROOT / "train_decoder.py"), "--config_file", str(path))
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)},
    )
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 400
        # the progress line that opens the first epoch's training (a pipe: plain lines, not a bar)
        while not any(line.startswith("epoch 1/") for line in lines) and time.time() < deadline:
            assert process.poll() is None, "".join(lines)
            time.sleep(0.5)
        time.sleep(3)  # a few steps into the epoch
        pids = rank_pids(process.pid)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGUSR1)  # the non-main rank only
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(timeout=10)
    output = "".join(lines)
    assert process.returncode == 0, output
    # said by the main rank, which got no signal itself
    assert re.search(r"stopped by SIGUSR1 during training of epoch 1 \(\d+ samples seen\): checkpoint saved", output)
    assert "Traceback" not in output
    progress = read_file(data_path / "latest.pth").state["progress"]
    # both ranks stopped after the same number of steps (one save, both RNG states; 8 samples a step)
    assert 0 < progress["batches_in_epoch"] < 50 and progress["samples_seen"] == progress["batches_in_epoch"] * 8
    assert len(read_file(data_path / "latest.pth").state["rng"]) == 2
    assert (data_path / "run_state.json").read_text().count('"finished": false') == 1
