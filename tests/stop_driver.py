"""Runs one of the package's commands with a real stop signal sent at a chosen moment of a chosen
phase (for tests/test_stop_signals.py). Nothing of the command is replaced: the driver only watches
the phase checks (`StopRequest.check`, which every phase calls at its check points) and the U-Net
evaluations (`Unet.forward`) to know when to send the signal, and counts the U-Net evaluations that
start after the signal arrived.

    python -m tests.stop_driver {train|evaluate|sample} ARGS...
    python -m tests.stop_driver group SPEC.json     # start a run's processes in this process group

`group` starts the processes SPEC.json lists ([{"argv": [...], "env": {...}, "log": path}, ...]) as
`srun` starts a run's tasks, every one in this process's group, waits for them, and writes their
exit statuses to SPEC.json's `.codes` file. It ignores the stop signals itself (a signal to the
group is for the processes it started, which get the default handling back).

Environment (all optional; without STOP_SIGNAL the command just runs):
    STOP_SIGNAL  TERM, INT or USR1
    STOP_PHASE   the phase to stop in, as the checks name it: training, validation, evaluation,
                 sample grids, sampling
    STOP_AFTER   send it during the first U-Net evaluation after the phase's N-th check (default 2),
                 that is in the middle of the phase's work, not at a check
    STOP_TARGET  self (this process) or group (its process group: the ranks and dataloader workers
                 started in it)
    STOP_RANK    the rank that sends it (default 0)
    STOP_REPORT  where to write what this process saw, as JSON, at exit (`.RANK.json` is appended):
                 {"sent_at": time or null, "received_at": time or null, "calls_after": U-Net
                  evaluations started after the signal arrived, "checks_passed_after": checks that
                  let the work go on after it arrived, "checks": {phase: count}}
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import time


def _install() -> None:
    from dalle2_decoder.models.unet import Unet
    from dalle2_decoder.stopping import StopRequest

    rank = int(os.environ.get("RANK", "0"))
    signal_name = os.environ.get("STOP_SIGNAL")
    phase = os.environ.get("STOP_PHASE", "training")
    after = int(os.environ.get("STOP_AFTER", "2"))
    sends = signal_name is not None and rank == int(os.environ.get("STOP_RANK", "0"))
    seen = {
        "sent_at": None,
        "received_at": None,
        "calls_after": 0,
        "checks_passed_after": 0,
        "checks": {},
        "armed": False,
    }

    original_check = StopRequest.check

    def check(self, accelerator, label):
        checks = seen["checks"]
        checks[label] = checks.get(label, 0) + 1
        if sends and label == phase and checks[label] == after and seen["sent_at"] is None:
            seen["armed"] = True
        received = seen["received_at"] is not None
        original_check(self, accelerator, label)
        if received:  # a check that let the work go on although this process had the signal
            seen["checks_passed_after"] += 1

    original_handle = StopRequest._handle

    def handle(self, signum, frame):
        if seen["received_at"] is None:
            seen["received_at"] = time.time()
        return original_handle(self, signum, frame)

    original_forward = Unet.forward

    def forward(self, *args, **kwargs):
        if seen["received_at"] is not None:
            seen["calls_after"] += 1
        elif seen["armed"]:
            seen["armed"] = False
            seen["sent_at"] = time.time()
            number = getattr(signal, "SIG" + signal_name)
            if os.environ.get("STOP_TARGET", "self") == "group":
                os.killpg(os.getpgrp(), number)
            else:
                os.kill(os.getpid(), number)
        return original_forward(self, *args, **kwargs)

    StopRequest.check = check
    StopRequest._handle = handle
    Unet.forward = forward

    report = os.environ.get("STOP_REPORT")
    if report:

        def write() -> None:
            values = {key: value for key, value in seen.items() if key != "armed"}
            with open(f"{report}.{rank}.json", "w") as handle_:
                json.dump(values, handle_)

        atexit.register(write)


def _reset_stop_signals() -> None:
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(number, signal.SIG_DFL)


def _group(spec_path: str) -> int:
    import subprocess

    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(number, signal.SIG_IGN)
    with open(spec_path) as handle:
        spec = json.load(handle)
    started = []
    for entry in spec:
        with open(entry["log"], "w") as log:
            started.append(
                subprocess.Popen(
                    entry["argv"],
                    env=entry["env"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_reset_stop_signals,
                )
            )
    codes = [process.wait() for process in started]
    with open(spec_path + ".codes", "w") as handle:
        json.dump(codes, handle)
    return 0


def main() -> int:
    command, argv = sys.argv[1], sys.argv[2:]
    if command == "group":
        return _group(argv[0])
    _install()
    if command == "train":
        from dalle2_decoder.cli import main as run
    elif command == "evaluate":
        from dalle2_decoder.evaluate import main as run
    elif command == "sample":
        from dalle2_decoder.sample import main as run
    else:
        raise SystemExit(f"unknown command {command!r}")
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
