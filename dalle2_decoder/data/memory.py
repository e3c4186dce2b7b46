"""Batch memory: cheap to fill, recycled where that is safe, and the one conversion of uint8
batches to floats.

Fresh memory costs a page fault per 4 KiB page on first touch plus the kernel zeroing it; for a
float batch of 64 images of 256px (50 MB) that costs about as much as decoding the JPEGs. So:
- batches in the main process live in private huge-page mappings (one fault per 2 MiB) that
  are recycled: a mapping goes back to the pool only once torch has let go of the memory (the
  batch and every view of it are freed, or its storage was moved elsewhere), so a batch a
  consumer still holds is never written again;
- a worker sends batches in a few pooled shared-memory buffers that the main process hands back
  once it has copied the batch out (`SharedBatchPool`).
`bench/data.py` measures the effect against plain decoding.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import weakref
from typing import List, Sequence

import numpy as np
import torch

HUGE_PAGE = 2 << 20
"""Transparent huge pages on x86-64 and most arm64 kernels; smaller batches are not worth it."""

_ADVISE = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
_PRIVATE = getattr(mmap, "MAP_PRIVATE", None)
_ANONYMOUS = getattr(mmap, "MAP_ANONYMOUS", None)


class RecycledMemory:
    """Huge-page mappings handed out as tensors and taken back when torch frees the memory.

    Each hand-out wraps the mapping in a new numpy array and makes the tensor with
    `torch.from_numpy`, whose storage holds that array for exactly as long as it uses the memory.
    A finalizer on the array returns the mapping to the free list, so reuse never depends on what
    the consumer does with the tensor. The `keep` most recently freed mappings are kept; older
    ones are unmapped.
    """

    def __init__(self, keep: int = 6):
        self.keep = keep
        self._free: List[mmap.mmap] = []
        self._lock = threading.Lock()  # finalizers run on whichever thread frees the batch
        self.created = 0
        """Mappings made so far (the rest of the hand-outs were recycled)."""

    def tensor(self, nbytes: int) -> torch.Tensor:
        """An uninitialised flat uint8 tensor of `nbytes`, starting on a huge-page boundary."""
        mapping = self._take(nbytes)
        base = np.frombuffer(mapping, dtype=np.uint8)
        start = (-base.ctypes.data) % HUGE_PAGE
        del base
        array = np.frombuffer(mapping, dtype=np.uint8, count=nbytes, offset=start)
        weakref.finalize(array, self._give_back, mapping)
        return torch.from_numpy(array)

    def _take(self, nbytes: int) -> mmap.mmap:
        with self._lock:
            for index, mapping in enumerate(self._free):
                if len(mapping) - HUGE_PAGE >= nbytes:
                    return self._free.pop(index)
        mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=_PRIVATE | _ANONYMOUS)
        mapping.madvise(_ADVISE)
        self.created += 1
        return mapping

    def _give_back(self, mapping: mmap.mmap) -> None:
        # Runs while the dying array still holds its buffer, so a mapping that is not kept is
        # left to be unmapped when that last reference goes (closing it here would fail). The
        # oldest free mapping goes first, so sizes no longer asked for (another phase's) age out.
        with self._lock:
            self._free.append(mapping)
            if len(self._free) > self.keep:
                del self._free[0]

    def _after_fork(self) -> None:
        # A fork (a dataloader worker starting) copies the free list; the child keeps its own,
        # with a new lock in case another thread held this one at the moment of the fork.
        self._lock = threading.Lock()


_RECYCLED = RecycledMemory()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_RECYCLED._after_fork)


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * (
        dtype.itemsize if hasattr(dtype, "itemsize") else torch.empty((), dtype=dtype).element_size()
    )


def empty_batch(shape: Sequence[int], dtype: torch.dtype, *, pin_memory: bool = False) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor for a batch the caller fills completely.

    Large batches come from `RecycledMemory` (private anonymous memory: shared anonymous memory
    is shmem, which most kernels keep out of huge pages). Falls back to `torch.empty` for small
    batches and where the OS has no such memory. `pin_memory` gives page-locked memory from
    torch's caching host allocator (which also recycles, and knows about pending CUDA copies).
    """
    if pin_memory:
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=True)
    nbytes = _nbytes(shape, dtype)
    if nbytes < HUGE_PAGE or None in (_ADVISE, _PRIVATE, _ANONYMOUS):
        return torch.empty(tuple(shape), dtype=dtype)
    try:
        raw = _RECYCLED.tensor(nbytes)
    except (OSError, ValueError):  # e.g. a kernel without transparent huge pages
        return torch.empty(tuple(shape), dtype=dtype)
    return raw.view(dtype).view(tuple(shape))


def unit_float_batch(images: torch.Tensor, *, pin_memory: bool = False) -> torch.Tensor:
    """uint8 images (0..255) as float32 in [0, 1], bit for bit what ToTensor computes
    (a float32 division by 255), in one vectorised pass into new batch memory."""
    out = empty_batch(images.shape, torch.float32, pin_memory=pin_memory)
    np.divide(images.contiguous().numpy(), np.float32(255), out=out.numpy())
    return out


def shared_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory (what a worker sends without another copy),
    allocated the way torch's default_collate allocates batches in workers."""
    template = torch.empty(0, dtype=dtype)
    try:
        storage = template._typed_storage()._new_shared(math.prod(shape), device="cpu")
    except (AttributeError, RuntimeError):  # a torch without this private call
        return torch.empty(tuple(shape), dtype=dtype).share_memory_()
    return template.new(storage).resize_(tuple(shape))


class SharedBatchPool:
    """Worker side: a few shared-memory batch buffers, refilled once the main process is done.

    A fresh shared-memory segment per batch costs a page fault per 4 KiB in the worker (shared
    memory gets no huge pages), about a tenth of a worker's time on 256px images. Instead each
    worker keeps `slots` buffers. A batch goes out in a free one, marked busy in a shared flag;
    the main process copies the batch out (`release_batch`: it converts to floats or copies into
    its own memory anyway) and clears the flag. A consumer never sees a pooled buffer, so reuse
    cannot overwrite a batch in use. With every buffer in flight, the batch gets a one-off
    segment: a slow consumer costs memory faults, never a wait.
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
    """A copy of `images` in new batch memory (out of a pooled shared buffer)."""
    out = empty_batch(images.shape, images.dtype, pin_memory=pin_memory)
    out.copy_(images)
    return out
