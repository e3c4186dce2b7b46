"""Worker batches in pooled shared-memory buffers, and the one conversion of uint8 batches to floats.

A batch that a worker sends travels in shared memory. A fresh segment per batch costs the worker a
page fault per 4 KiB page as it fills it (shared memory gets no huge pages): for 64 uint8 images
of 256px, 12 MiB, 20-40 ms more than refilling a warm buffer, next to 90-260 ms to decode the
JPEGs (`bench/batch_memory.py`, docs/DATA.md). So each worker keeps a few buffers and refills one
once the main process has copied the batch out of it (`SharedBatchPool`, `BatchReleaser`). That
copy is no extra work: the main process converts to floats there, or copies into page-locked
memory with `pin_memory` (which the DataLoader's own pinning would do anyway).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def unit_float_batch(images: torch.Tensor, *, pin_memory: bool = False) -> torch.Tensor:
    """uint8 images (0..255) as float32 in [0, 1], bit for bit what ToTensor computes
    (a float32 division by 255), in one vectorised pass into a new (page-locked) batch."""
    out = torch.empty(images.shape, dtype=torch.float32, pin_memory=pin_memory)
    np.divide(images.contiguous().numpy(), np.float32(255), out=out.numpy())
    return out


def shared_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory. `share_memory_` copies the (unwritten) contents
    into a new segment, which is why the pool makes few and keeps them."""
    return torch.empty(tuple(shape), dtype=dtype).share_memory_()


class SharedBatchPool:
    """Worker side: a few shared-memory batch buffers, refilled once the main process is done.

    Each worker keeps `slots` buffers. A batch goes out in a free one, marked busy in a shared
    flag; the main process copies the batch out (`BatchReleaser.release`, after it converted to
    floats or copied into its own memory) and clears the flag. A consumer never sees a pooled
    buffer, so reuse cannot overwrite a batch in use. With every buffer in flight, the batch gets
    a one-off segment: a slow consumer costs memory faults, never a wait.
    """

    def __init__(self, slots: int):
        self.flags = shared_empty((slots,), torch.uint8).zero_()
        self._busy = self.flags.numpy()
        self._buffers: list = [None] * slots

    def acquire(self, shape: Sequence[int], dtype: torch.dtype):
        """(tensor of `shape`, ticket): the ticket goes to the main process with the batch."""
        nbytes = _nbytes(shape, dtype)
        for index, buffer in enumerate(self._buffers):
            if self._busy[index]:
                continue
            if buffer is None or buffer.numel() < nbytes:
                buffer = self._buffers[index] = shared_empty((nbytes,), torch.uint8)
            self._busy[index] = 1
            return buffer[:nbytes].view(dtype).view(tuple(shape)), (self.flags, index)
        return shared_empty(shape, dtype), None


class BatchReleaser:
    """Main side of `SharedBatchPool`: hands buffers back, and keeps each one mapped.

    Holding the received buffers means the next batch in the same buffer is found in torch's
    shared-storage cache instead of being mapped (and faulted in) again.
    """

    def __init__(self):
        self._held: dict = {}

    def release(self, worker: int, ticket, received: torch.Tensor) -> None:
        if ticket is None:
            return
        flags, index = ticket
        self._held[worker, index] = (flags, received)
        flags[index] = 0

    def clear(self) -> None:
        self._held.clear()


def copy_batch(images: torch.Tensor, *, pin_memory: bool = False) -> torch.Tensor:
    """A copy of `images` in new (page-locked) batch memory, out of a pooled shared buffer."""
    out = torch.empty(images.shape, dtype=images.dtype, pin_memory=pin_memory)
    out.copy_(images)
    return out
