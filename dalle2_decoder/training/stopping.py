"""Stopping safely: signals become a request that the loop honours at the next step boundary.

SLURM sends SIGUSR1 (with `--signal=USR1@...`) or SIGTERM before preempting a job; Ctrl-C sends
SIGINT. The handler only records the request; the loop then saves a checkpoint and exits cleanly,
so a requeued job auto-resumes. All ranks agree on the decision through one tiny all-reduce, so
no rank stops while another waits in a collective.
"""

from __future__ import annotations

import signal
from typing import Dict, Optional

import torch

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """Installed once at start; `requested` turns true when one of the handled signals arrives."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: Dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> "StopRequest":
        for sig in HANDLED_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners): no handler
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            # A second Ctrl-C means "now": restore the default behaviour and interrupt.
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self, accelerator) -> bool:
        """True on every rank when any rank was asked to stop."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
