"""Stop signals and child processes: the main process decides what a stop means, its children do not.

Schedulers and shells stop a job by signalling every process of it: SLURM's time limit and
`scancel` (every process of the step), `timeout`, `kill -- -PGID`, container runtimes, Ctrl-C in a
terminal (the foreground process group). The training, evaluation and sampling processes turn
such a signal into an orderly stop (`dalle2_decoder.stopping`). Their dataloader workers, and the
`pipe:` commands those start, must not die of it first: a worker killed by SIGTERM makes torch
raise "DataLoader worker ... is killed by signal" in the main process, at whatever line it is on,
and the stop becomes a crash without a checkpoint.

So children are started with the stop signals blocked (`stop_signals_blocked`), and a dataloader
worker keeps them blocked for good (`leave_stop_signals_to_parent`, its `worker_init_fn`): a
signal that reaches the group waits, blocked, whenever it arrives, and one thread of the worker
takes it with `sigwaitinfo`, which says who sent it. A SIGTERM from the worker's own parent is
the parent ending it (torch's loader shutdown, `multiprocessing`'s exit handler, which joins the
worker after it): the worker leaves at once with status 0, as torch's own worker handler does.
Any other sender's stop signal is dropped; the main process ends its workers itself when it
stops. The mask survives `exec`, so the commands of `pipe:` shards keep the signals blocked as
well, and end when their pipe is closed.
"""

from __future__ import annotations

import contextlib
import os
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
    """In a child process: keep the stop signals blocked, and let a thread take them as they come.

    Usable as a `worker_init_fn`; it expects the signals still blocked from `stop_signals_blocked`
    (it blocks them again in case not). A SIGTERM sent by the parent ends the child with status 0;
    the other stop signals, and any sent by another process, are dropped: the parent, which got
    them too, decides when the child ends. The dispositions go back to the default, since the
    kernel discards a signal whose disposition is "ignore" before `sigwaitinfo` could see it.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    parent = os.getppid()
    threading.Thread(target=_take_stop_signals, args=(parent,), name="stop-signals", daemon=True).start()


def _take_stop_signals(parent: int) -> None:
    """Wait for the blocked stop signals for the rest of the process; leave on the parent's SIGTERM."""
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)
