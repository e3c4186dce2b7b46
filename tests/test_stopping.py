"""The stop machinery piece by piece, in this process with real signals (the end-to-end runs are in
tests/test_stop_signals.py): the request, repeats and a second Ctrl-C, torch's worker-death handler
set aside during a stop, loaders that fail during a stop, workers that ignore the stop signals, the
exit status under a launcher, and sample grids that do not depend on how examples are shared."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from dalle2_decoder.common.signals import STOP_SIGNALS, leave_stop_signals_to_parent, stop_signals_blocked
from dalle2_decoder.failures import EXIT_OK, EXIT_STOPPED
from dalle2_decoder.stopping import SECOND_INTERRUPT_AFTER_S, StopRequest, StopRequested, exit_status_after_stop


@pytest.fixture
def stop():
    request = StopRequest().install()
    yield request
    request.uninstall()


def deliver(signum: int) -> None:
    """Send `signum` to this process and give Python the moment it needs to run the handler."""
    os.kill(os.getpid(), signum)
    time.sleep(0.01)


DOCUMENTED_STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
"""docs/TRAINING.md: SLURM's pre-emption warning, TERM (time limit, scancel, timeout), Ctrl-C. Written
out here rather than taken from the code, so that a signal dropped from STOP_SIGNALS fails a test."""


def test_the_stop_signals_are_the_documented_ones():
    assert sorted(STOP_SIGNALS) == sorted(DOCUMENTED_STOP_SIGNALS)


@pytest.mark.parametrize("signum", DOCUMENTED_STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_each_stop_signal_becomes_a_request_the_check_raises(stop, signum):
    stop.check(None, "training")  # nothing asked yet
    deliver(signum)
    assert stop.requested and stop.signal_name == signal.Signals(signum).name
    with pytest.raises(StopRequested) as raised:
        stop.check(None, "validation")
    assert raised.value.phase == "validation" and str(raised.value).startswith(f"stopped by {stop.signal_name}")


def test_repeats_change_nothing_and_only_a_late_second_ctrl_c_interrupts(stop):
    deliver(signal.SIGTERM)
    deliver(signal.SIGTERM)  # a launcher passing the group's signal on
    deliver(signal.SIGINT)  # a second signal of another kind, at once
    assert stop.signal_name == "SIGTERM"
    stop.requested_at -= SECOND_INTERRUPT_AFTER_S  # as if the first had come that long ago
    with pytest.raises(KeyboardInterrupt):
        deliver(signal.SIGINT)


def test_uninstall_restores_the_handlers(stop):
    assert signal.getsignal(signal.SIGTERM) == stop._handle
    stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    stop.install()  # for the fixture's own uninstall


def test_torchs_worker_death_handler_is_set_aside_during_a_stop_and_restored(stop):
    raised = []

    def worker_death_handler(signum, frame):  # stands for torch's, which raises "worker killed"
        raised.append(signum)

    previous = signal.signal(signal.SIGCHLD, worker_death_handler)
    try:
        deliver(signal.SIGCHLD)
        assert raised == [signal.SIGCHLD]
        deliver(signal.SIGUSR1)
        assert signal.getsignal(signal.SIGCHLD) is signal.SIG_DFL  # a worker dying now is part of the stop
        deliver(signal.SIGCHLD)
        assert raised == [signal.SIGCHLD]
        stop.uninstall()
        assert signal.getsignal(signal.SIGCHLD) is worker_death_handler
        stop.install()
    finally:
        signal.signal(signal.SIGCHLD, previous)


def failing_loader(fail_at: int):
    for index in range(10):
        if index == fail_at:
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")
        yield index


def test_a_loader_that_fails_during_a_stop_is_the_stop_and_otherwise_an_error(stop):
    with pytest.raises(RuntimeError, match="killed by signal"):
        list(stop.batches(failing_loader(2), None, "training"))
    seen = []
    with pytest.raises(StopRequested) as raised:
        for batch in stop.batches(failing_loader(2), None, "training"):
            seen.append(batch)
            if batch == 1:
                stop.signal_name = "SIGTERM"  # the stop arrives while batch 1 is used
    assert seen == [0, 1] and isinstance(raised.value.__cause__, RuntimeError)


def test_batches_checks_before_each_batch_and_closes_the_loader(stop):
    closed = []

    def loader():
        try:
            yield from range(5)
        finally:
            closed.append(True)

    marks, used = [], []
    with pytest.raises(StopRequested):
        for batch in stop.batches(loader(), None, "training", before_fetch=lambda: marks.append(len(used))):
            used.append(batch)
            if batch == 2:
                deliver(signal.SIGUSR1)
    assert used == [0, 1, 2] and marks == [0, 1, 2, 3] and closed == [True]


def test_the_stopped_status_is_0_only_under_an_elastic_launcher(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert exit_status_after_stop() == EXIT_STOPPED
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert exit_status_after_stop() == EXIT_OK


def _child_that_leaves_the_signals_to_its_parent(report: int) -> None:
    """Run in a forked child: stop signals sent by itself (as a shell would send, from elsewhere) and
    before it has chosen are dropped; it then reports being alive and waits for its parent's word."""
    os.kill(os.getpid(), signal.SIGTERM)  # arrives while still blocked from the fork
    leave_stop_signals_to_parent()
    for signum in STOP_SIGNALS:
        os.kill(os.getpid(), signum)
    time.sleep(0.05)
    os.write(report, b"alive")
    time.sleep(60)  # only the parent's SIGTERM ends this early
    os._exit(3)


def test_children_drop_stop_signals_from_others_and_leave_on_the_parents_sigterm(stop):
    """A child started inside `stop_signals_blocked` that runs `leave_stop_signals_to_parent` survives
    stop signals from any other process, also one sent before it chose, and leaves with status 0 at
    once when its parent sends SIGTERM (torch's loader shutdown and multiprocessing's exit handler do:
    a child that ignored it would hang the parent's exit). The parent's own signal arrives after the block."""
    read_end, write_end = os.pipe()
    with stop_signals_blocked():
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            try:
                _child_that_leaves_the_signals_to_its_parent(write_end)
            finally:
                os._exit(4)
        os.kill(os.getpid(), signal.SIGUSR1)  # held back while blocked (or taken by another thread,
        if threads_of_this_process() == 1:  # as under pytest-xdist, and handled here all the same)
            assert not stop.requested
    time.sleep(0.01)
    assert stop.signal_name == "SIGUSR1"
    os.close(write_end)
    assert os.read(read_end, 16) == b"alive"
    os.close(read_end)
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_dataloader_workers_survive_a_stop_signal_sent_to_them(tmp_path):
    from dalle2_decoder.config import TrainDecoderConfig
    from dalle2_decoder.data import create_dataloaders

    from .training_fixtures import tiny_config, write_tiny_demo

    config = TrainDecoderConfig.from_dict(tiny_config(write_tiny_demo(tmp_path / "demo"), tmp_path / "run"))
    loader = create_dataloaders(config.data, seed=0, epoch_samples=24, validation_samples=8)["train"]
    loader.set_epoch(0)
    before = set(children())
    batches = iter(loader)
    first = next(batches)
    workers = set(children()) - before
    assert len(workers) == 1
    for pid in workers:  # blocked, not ignored: an ignored signal could not be told apart by its sender
        masks = dict(line.split(":\t") for line in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in line)
        bits = sum(1 << (signum - 1) for signum in STOP_SIGNALS)
        assert int(masks["SigBlk"], 16) & bits == bits and int(masks["SigIgn"], 16) & bits == 0, masks
    for pid in workers:  # sent by another process, as a shell or scheduler does (the worker quits
        for signum in STOP_SIGNALS:  # quietly when its own parent sends SIGTERM)
            subprocess.run(["kill", f"-{signal.Signals(signum).name[3:]}", str(pid)], check=True)
    rest = list(batches)  # the worker is still there and delivers the epoch
    assert 1 + len(rest) == len(loader) and torch.is_tensor(first["image"])


EXIT_WITH_WORKERS_UP = """
import json, sys
from dalle2_decoder.config import TrainDecoderConfig
from dalle2_decoder.data import create_dataloaders
config = TrainDecoderConfig.from_dict(json.load(open(sys.argv[1])))
loader = create_dataloaders(config.data, seed=0, epoch_samples=24, validation_samples=8)["train"]
loader.set_epoch(0)
BATCHES = iter(loader)  # kept to the end, as a traceback keeps the iterator of a failed epoch
next(BATCHES)
sys.exit(7)
"""


@pytest.mark.slow
def test_a_process_that_exits_with_its_workers_up_ends(tmp_path):
    """At exit, multiprocessing terminates (SIGTERM) and joins the loader's workers before the
    iterator that would shut them down is collected: workers that ignored SIGTERM hung that exit
    forever (a run on wholly bad data never ended)."""
    import json
    import sys

    from .training_fixtures import tiny_config, write_tiny_demo

    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config(write_tiny_demo(tmp_path / "demo"), tmp_path / "run")))
    result = subprocess.run(
        [sys.executable, "-c", EXIT_WITH_WORKERS_UP, str(config)], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 7, result.stderr[-2000:]


def threads_of_this_process() -> int:
    """Native threads included (pytest-xdist's workers run some that Python's threading does not list)."""
    with open("/proc/self/status") as handle:
        return int(next(line.split()[1] for line in handle if line.startswith("Threads:")))


def children():
    """Live child processes of this one (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                found.append(int(entry))
    return found
