"""The random streams of accumulated micro-batches: each micro-batch of an optimizer step draws its
noise from a stream of its own, so gradient accumulation and more processes compute alike.

Slot 0 uses the process's stream (seeded `seed + rank`, as always); slot k >= 1 of rank r a
stream seeded `seed + k * processes + r`. Each micro-batch of the global batch then has the
stream it would have with one process per micro-batch: a run of P processes accumulating A
micro-batches draws what P * A processes without accumulation draw, so the two compute the same
optimizer steps on the same data (tests/test_sharded_training.py compares 2 sharded processes
with 1 process accumulating 2).
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional

import torch


class MicroBatchStreams:
    """The streams of slots 1 and up, each kept between its uses (and saved with the process's RNG state)."""

    def __init__(self, seed: Optional[int], device: torch.device, processes: int, rank: int) -> None:
        """`seed`: the run's seed; None draws every micro-batch from the process's stream."""
        self.seed, self.device, self.processes, self.rank = seed, device, processes, rank
        self._states: Dict[int, Dict[str, Any]] = {}
        """The random state of each slot's stream after its last use (k >= 1)."""

    @contextlib.contextmanager
    def slot(self, slot: int) -> Iterator[None]:
        """Draw from micro-batch `slot`'s stream inside the block; the process's stream is left as it was."""
        if slot == 0 or self.seed is None:
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            state = self._states.get(slot)
            if state is None:
                torch.manual_seed(self.seed + slot * self.processes + self.rank)
            else:
                set_stream_state(state, self.device)
            yield
            self._states[slot] = stream_state(self.device)

    def state_dict(self) -> Dict[str, Any]:
        return {str(slot): state for slot, state in self._states.items()}

    def load_state_dict(self, saved: Optional[Dict[str, Any]]) -> None:
        self._states = {int(slot): state for slot, state in (saved or {}).items()}


def stream_state(device: torch.device) -> Dict[str, Any]:
    """The global random state a micro-batch stream draws from (CPU, and the CUDA device's)."""
    state: Dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_stream_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
