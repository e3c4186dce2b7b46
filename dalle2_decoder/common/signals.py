"""Stop signals and child processes: the main process decides what a stop means, its children do not.

Schedulers and shells stop a job by signalling every process of it: SLURM's time limit and
`scancel` (every process of the step), `timeout`, `kill -- -PGID`, container runtimes, Ctrl-C in a
terminal (the foreground process group). The training, evaluation and sampling processes turn
such a signal into an orderly stop (`dalle2_decoder.stopping`). Their dataloader workers, and the
`pipe:` commands those start, must not die of it first: a worker killed by SIGTERM makes torch
raise "DataLoader worker ... is killed by signal" in the main process, at whatever line it is on,
and the stop becomes a crash without a checkpoint.

So children are started with the stop signals blocked (`stop_signals_blocked`), and a worker
ignores them before unblocking (`leave_stop_signals_to_parent`, its `worker_init_fn`): a signal
that reaches the group then finds the worker ignoring it, whenever it arrives, and the main
process ends the workers itself when it stops. An ignored disposition survives `exec`, so the
commands of `pipe:` shards ignore the signals as well; they end when their pipe is closed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""The signals that ask a run to save and stop: SLURM's pre-emption warning (USR1), TERM, Ctrl-C."""


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block the stop signals in this thread while children are forked from it.

    A forked child starts with its parent's signal mask, so the signals stay blocked in it until
    it has chosen what to do with them. In this process a signal that arrives meanwhile is only
    held back (or taken by another thread) and is handled once the block ends: none is lost.
    """
    if threading.current_thread() is not threading.main_thread():
        # Signals are handled by the main thread only; other threads' masks do not matter here.
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def leave_stop_signals_to_parent(*_: object) -> None:
    """In a child process: ignore the stop signals, then unblock them (usable as a `worker_init_fn`).

    A signal that was held back while blocked is discarded by the ignore; the parent, which got it
    too, decides when the child ends.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
