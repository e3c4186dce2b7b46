"""Stopping safely: a stop signal becomes a request that every phase honours within one batch or U-Net call.

SLURM sends SIGUSR1 (with `--signal=USR1@...`) before a time limit or pre-emption and SIGTERM at
it (to every process of the step), `scancel`, `timeout` and container runtimes send SIGTERM, Ctrl-C
sends SIGINT to the terminal's process group. The handler only records the request. Each phase
then checks it at points every rank reaches together (after each training step, each validation
batch, each U-Net call while sampling) through `StopRequest.check`, which agrees across ranks with
one tiny all-reduce and raises `StopRequested` on every rank at once: the phase unwinds, its
partial results are dropped, and the caller saves what must be kept and exits with the "stopped"
status (`exit_status_after_stop`).

The dataloader workers ignore these signals (`common/signals.py`); should a child die anyway while
a stop is under way, that is part of the stop, not an error: torch's SIGCHLD handler, which would
raise in the middle of whatever the main process is doing (a checkpoint write included), is set
aside once a stop is requested, and a loader that then fails is read as the stop (`batches`).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable, ClassVar, Dict, Iterable, Iterator, Optional, TypeVar

import torch

from .common.signals import STOP_SIGNALS
from .failures import EXIT_OK, EXIT_STOPPED

T = TypeVar("T")

SECOND_INTERRUPT_AFTER_S = 3.0
"""A second Ctrl-C at least this long after the first stops at once, without saving. Sooner, it is
taken for the same stop passed on (torchrun forwards the signal it gets to its workers within
milliseconds), so a launcher cannot cut a save short by repeating the signal."""


class StopRequested(Exception):
    """Raised on every rank at the same point when a stop signal arrived: unwinds the phase being run."""

    exit_status: ClassVar[int] = EXIT_STOPPED

    def __init__(self, signal_name: str, phase: str):
        self.signal_name = signal_name
        self.phase = phase
        self.progress = ""
        """How far the phase got, in words, where the phase says (e.g. "3 of 8 images generated")."""
        super().__init__(f"stopped by {signal_name} during {phase}")


def exit_status_after_stop() -> int:
    """The exit status of a process that stopped on a signal after saving what it had to.

    EXIT_STOPPED ("stopped": the run did not finish and resumes from its checkpoint), except under
    torchrun / `accelerate launch`: such a launcher takes any status but 0 from a worker for a
    failure (it reports the run as failed, stops the other workers and may restart them), so there
    the processes exit 0 and the stop is said in their last line and in the run state.
    """
    return EXIT_OK if os.environ.get("TORCHELASTIC_RUN_ID") else EXIT_STOPPED


class StopRequest:
    """Installed once at start; `requested` turns true when one of the stop signals arrives."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self.requested_at: Optional[float] = None
        """`time.monotonic()` when the first stop signal arrived."""
        self._previous: Dict[int, object] = {}
        self._sigchld_previous: Optional[Callable] = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> "StopRequest":
        """Handle the stop signals from now on (a second call changes nothing)."""
        if self.installed:
            return self
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners): no handler
                pass
        return self

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signal_name is not None:
            if signum == signal.SIGINT and now - self.requested_at >= SECOND_INTERRUPT_AFTER_S:
                raise KeyboardInterrupt  # a second Ctrl-C means "now"
            return  # the same stop again (the group and a launcher both signal a worker): nothing new
        self.signal_name = signal.Signals(signum).name
        self.requested_at = now
        self._set_aside_worker_failure_handler()

    def _set_aside_worker_failure_handler(self) -> None:
        """Stop torch's SIGCHLD handler from raising at an arbitrary line while the stop is handled.

        A worker that dies from now on is found by the loader itself at its next batch (torch
        checks its workers while waiting), where `batches` reads it as part of the stop. SIG_DFL,
        not SIG_IGN: ignoring SIGCHLD would reap children behind `subprocess`'s back.
        """
        current = signal.getsignal(signal.SIGCHLD)
        if callable(current):
            self._sigchld_previous = current
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._sigchld_previous is not None:
            signal.signal(signal.SIGCHLD, self._sigchld_previous)
            self._sigchld_previous = None

    def agreed(self, accelerator) -> Optional[str]:
        """The name of a stop signal any rank got, on every rank; None when none did (a collective:
        every rank must call it). One all-reduce of one flag per stop signal."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.signal_name
        got = [1.0 if self.signal_name == signal.Signals(sig).name else 0.0 for sig in STOP_SIGNALS]
        counts = accelerator.reduce(torch.tensor(got, device=accelerator.device), reduction="sum").tolist()
        return next((signal.Signals(sig).name for sig, count in zip(STOP_SIGNALS, counts) if count > 0), None)

    def check(self, accelerator, phase: str) -> None:
        """Raise `StopRequested` on every rank when any rank was asked to stop (every rank must call it)."""
        name = self.agreed(accelerator)
        if name is not None:
            raise StopRequested(name, phase)

    def checker(self, accelerator, phase: str) -> Callable[..., None]:
        """`check` for `phase` as a callable of any arguments (a sampling hook, say)."""
        return lambda *_: self.check(accelerator, phase)

    def batches(
        self, batches: Iterable[T], accelerator, phase: str, *, before_fetch: Optional[Callable[[], None]] = None
    ) -> Iterator[T]:
        """Iterate `batches` with a `check` before each batch is handed out (every rank must iterate alike).

        `before_fetch` runs before each batch is read (the training loop marks its random state
        there: reading may draw from it). A loader that fails while a stop is under way (a worker
        killed with the rest of the process group) is read as part of the stop: this rank has no
        batch, but the check it still takes part in stops every rank. The loader and its workers
        are closed when the iteration ends, also on an exception, so a stopped phase leaves no
        worker behind to fail during the save that follows.
        """
        iterator = iter(batches)
        try:
            while True:
                if before_fetch is not None:
                    before_fetch()
                failure: Optional[BaseException] = None
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                except Exception as error:
                    if not self.requested:
                        raise
                    failure = error
                try:
                    self.check(accelerator, phase)
                except StopRequested as stop:
                    raise stop from failure
                yield batch
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
