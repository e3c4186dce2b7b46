"""CPU compute threads chosen from what the data workers actually use (dalle2_decoder/runtime.py)."""

from __future__ import annotations

import os
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
    # 2 cores, 1 worker that mostly waits (so one thread would leave a core idle): both cores compute.
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


# --- the process group: DDP's ignore list, lost peers, shut-down ------------------------------------


def test_ddp_ignore_is_honoured_by_distributed_data_parallel(tmp_path):
    """Pins torch's private `_set_params_and_buffers_to_ignore_for_model` (used through `ddp_ignore` only):
    fails when torch renames it or when DDP stops reading what it stores."""
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from dalle2_decoder.runtime import ddp_ignore

    def model() -> nn.Module:
        layers = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        layers[0].requires_grad_(False)  # only the second layer trains
        return layers

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        DistributedDataParallel(model())  # a trained layer: DDP wraps it
        ignoring = model()
        ddp_ignore(ignoring, ["1.weight", "1.bias"])
        # With the trained layer ignored, DDP sees no parameter that needs a gradient and refuses.
        with pytest.raises(RuntimeError, match="doesn't have any parameter that requires a gradient"):
            DistributedDataParallel(ignoring)
    finally:
        dist.destroy_process_group()


def test_a_lost_peer_becomes_one_io_error_and_other_errors_pass_unchanged():
    from dalle2_decoder.failures import EXIT_IO, report
    from dalle2_decoder.runtime import PeerLostError, lost_peers_reported

    with pytest.raises(PeerLostError) as lost:
        with lost_peers_reported():
            raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    assert "lost contact with another process of this run" in str(lost.value)
    assert "Connection closed by peer" in str(lost.value) and "\n" not in str(lost.value)
    assert PeerLostError.exit_status == EXIT_IO
    with open(os.devnull, "w") as quiet:
        assert report(lost.value, stream=quiet) == EXIT_IO
    bug = RuntimeError("shape mismatch in a matmul")
    with pytest.raises(RuntimeError) as passed:
        with lost_peers_reported():
            raise bug
    assert passed.value is bug


def test_errors_declare_their_exit_status():
    from dalle2_decoder.failures import EXIT_CHECKPOINT, EXIT_STOPPED, report
    from dalle2_decoder.loading import DecoderLoadError
    from dalle2_decoder.training.loop import TrainingStopped

    assert TrainingStopped.exit_status == EXIT_STOPPED
    assert DecoderLoadError.exit_status == EXIT_CHECKPOINT
    with open(os.devnull, "w") as quiet:
        assert report(TrainingStopped("non-finite losses"), stream=quiet) == EXIT_STOPPED
        assert report(DecoderLoadError("no such file"), stream=quiet) == EXIT_CHECKPOINT


def test_preflight_leaves_train_device_to_the_launcher_exactly_when_the_accelerator_does(monkeypatch):
    """`create_accelerator` lets the launcher choose the device when `runtime.launched()`; the
    pre-flight check of `train.device` must stand aside in exactly those cases, one process included."""
    from dalle2_decoder.preflight import device_problems
    from dalle2_decoder.runtime import launched

    for name in ("WORLD_SIZE", "ACCELERATE_MIXED_PRECISION", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    absent = "cuda:64"  # no machine here has a 65th GPU, so a plain run refuses it
    assert not launched() and device_problems(absent)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # `accelerate launch` of one process
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launched() and device_problems(absent) == []
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun
    assert launched() and device_problems(absent) == []
