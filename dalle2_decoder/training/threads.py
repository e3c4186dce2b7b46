"""CPU compute threads from what the data workers actually use.

On the CPU, torch's compute threads and the dataloader workers share the cores this process may
use. A fixed split (one core per worker) leaves a core idle whenever the workers wait, which with
decoded-once shards is most of the time: on 2 cores with 1 worker, one compute thread made a
2-epoch 64px run 1.6x slower than two. So the run starts with every core for compute, measures
the CPU time its workers really take (from /proc, every few steps), and gives up one compute
thread for each core's worth the workers keep busy; it takes them back when the workers use less.
`OMP_NUM_THREADS` set by the user turns all of this off.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Dict, Optional

import torch

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def children_cpu_seconds(pid: Optional[int] = None) -> Optional[Dict[int, float]]:
    """CPU seconds (user + system) of each live child of `pid` (this process), or None without /proc."""
    parent = os.getpid() if pid is None else pid
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    found: Dict[int, float] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state, ppid, ..., utime (14th field overall) and stime (15th).
        if int(fields[1]) == parent:
            found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / _TICKS
    return found


class ComputeThreads:
    """Chooses `torch.set_num_threads` for one training process on the CPU.

    `cores`: the cores this process may use (its share when several processes run on one node).
    Call `update()` from the training thread every few steps (torch's thread count is per thread).
    """

    HYSTERESIS = 0.15
    """Cores' worth of worker use beyond the half-way point before a thread is given up or taken back."""

    def __init__(self, cores: int) -> None:
        self.cores = max(1, cores)
        self.threads = self.cores
        self.worker_cores = 0.0
        """Cores' worth of CPU the workers used in the last window."""
        self._last: Optional[tuple] = None

    def start(self) -> int:
        torch.set_num_threads(self.threads)
        self._last = None
        return self.threads

    def update(self) -> Optional[int]:
        """Measure the workers since the last call; returns the new thread count when it changed."""
        now, usage = time.monotonic(), children_cpu_seconds()
        if usage is None:
            return None
        last, self._last = self._last, (now, usage)
        if last is None or now - last[0] <= 0:
            return None
        before = last[1]
        # Workers started since the last call (a new epoch) count from zero.
        used = sum(max(0.0, seconds - before.get(pid, 0.0)) for pid, seconds in usage.items())
        self.worker_cores = used / (now - last[0])
        threads = threads_for(self.cores, self.threads, self.worker_cores, self.HYSTERESIS)
        if threads == self.threads:
            return None
        self.threads = threads
        torch.set_num_threads(threads)
        return threads


def threads_for(cores: int, threads: int, worker_cores: float, margin: float = ComputeThreads.HYSTERESIS) -> int:
    """Compute threads for `cores` cores when the workers keep `worker_cores` cores' worth busy.

    The k-th core is given up once the workers use more than k - 0.5 (+ margin) cores and taken
    back below k - 0.5 (- margin): a compute thread that shares its core with a busy worker stalls
    the other threads at every synchronisation, while a worker that is mostly idle costs little.
    """
    reserved = cores - threads
    if worker_cores > reserved + 0.5 + margin:
        reserved = math.floor(worker_cores + 0.5 - margin)
    elif worker_cores < reserved - 0.5 - margin:
        reserved = max(0, math.floor(worker_cores + 0.5 + margin))
    return max(1, cores - reserved)


def compute_threads_for(device_type: str, local_processes: int) -> Optional[ComputeThreads]:
    """The policy for this process, or None (not on the CPU, or OMP_NUM_THREADS chosen by the user)."""
    if device_type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    return ComputeThreads(available_cores() // max(1, local_processes))
