"""CPU compute threads chosen from what the data workers actually use (dalle2_decoder/runtime.py)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from dalle2_decoder.runtime import ComputeThreads, children_cpu_seconds, compute_threads_for, threads_for


@pytest.fixture
def keep_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_idle_workers_leave_every_core_to_compute_busy_ones_take_cores_back():
    # 2 cores, 1 worker that mostly waits (the case that used to run on one thread): both cores compute.
    assert threads_for(2, 2, 0.1) == 2
    assert threads_for(2, 2, 0.6) == 2  # inside the margin: no change
    assert threads_for(2, 2, 0.9) == 1  # a worker busy most of the time gets its core
    assert threads_for(2, 1, 0.5) == 1  # ... and keeps it until it clearly uses less (no flapping)
    assert threads_for(2, 1, 0.2) == 2
    assert threads_for(8, 8, 3.2) == 5  # 8 cores, workers using 3.2: three given up
    assert threads_for(8, 5, 1.1) == 7
    assert threads_for(2, 2, 5.0) == 1  # never fewer than one


def test_the_busy_childs_cpu_time_is_measured_and_threads_follow(keep_threads):
    policy = ComputeThreads(cores=2)
    assert policy.start() == 2 and torch.get_num_threads() == 2
    policy.update()  # first window starts
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 30\nwhile time.time() < end: pass"]
    )
    try:
        time.sleep(1.5)
        seconds = children_cpu_seconds()
        assert seconds is not None and child.pid in seconds and seconds[child.pid] > 0
        policy.update()
        # Whatever share of a core the busy child got on this (shared) machine is what was measured,
        # and the thread count follows from it.
        assert policy.worker_cores > 0
        assert policy.threads == threads_for(2, 2, policy.worker_cores) == torch.get_num_threads()
    finally:
        child.kill()
        child.wait()
    # A window in which no worker ran: the baseline is every child's CPU time now (other children of
    # the test process, e.g. a wandb service started by an earlier test, count only for what they use
    # from here on, which is next to nothing).
    policy._last = (time.monotonic() - 1.0, children_cpu_seconds())
    policy.update()
    assert policy.worker_cores < 0.25 and policy.threads == 2 == torch.get_num_threads()


def test_user_choice_and_gpus_turn_the_policy_off(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert compute_threads_for("cuda", 1) is None
    policy = compute_threads_for("cpu", 2)
    assert policy is not None and policy.cores >= 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert compute_threads_for("cpu", 1) is None
