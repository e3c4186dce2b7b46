"""What batch memory costs per batch: fresh tensors against the recycled memory of another commit.

    python bench/batch_memory.py --baseline REF [--sizes 256 64] [--batch-size 64] [--rounds 15]

The end-to-end comparison (`bench/data_versions.py`) moves by 10-20% between rounds on a shared
machine, more than the memory part of the loader can change; this one times that part alone, in
one process, so a small difference shows. `data/memory.py` of commit REF (it imports nothing of
the package) is loaded as a module. For uint8 batches of `--batch-size` images (what the training
loop reads), per batch, median over `--rounds` rounds with the variants alternating:
- where a worker writes a batch: a fresh shared-memory tensor (`torch.empty(...).share_memory_()`,
  then filled; and allocated in shared memory directly, as torch's default_collate does with a
  private call) against one of REF's pooled shared buffers (`SharedBatchPool`, warm);
- where the main process writes one (0 workers): a fresh `torch.empty` against REF's recycled
  huge-page memory (`empty_batch`), both filled;
- REF's main process with workers copied each received batch out of the pooled buffer
  (`copy_batch`; into page-locked memory with pin_memory, which the DataLoader's pinning does
  too): the price REF paid for recycling;
- float batches (the loader's default; the evaluation and sampling commands read them): the main
  process turns a received uint8 batch into floats, into fresh memory against REF's recycled
  huge pages (`unit_float_batch` of each). A float batch of 64 images of 256px is 48 MiB, above
  glibc's largest mmap threshold (32 MiB), so fresh memory is a new mapping, page-faulted in, each
  time; a uint8 batch (12 MiB) is reused by malloc;
- for scale: decoding the batch's JPEGs with PIL (what every variant also does, per worker).
Filling is the same for all (one pass per image, HWC to CHW), so differences are the memory's.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def load_memory_module(ref: str, scratch: str):
    source = subprocess.run(
        ["git", "-C", ROOT, "show", f"{ref}:dalle2_decoder/data/memory.py"], check=True, capture_output=True
    ).stdout
    path = os.path.join(scratch, "baseline_memory.py")
    with open(path, "wb") as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location("baseline_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fill(out: torch.Tensor, images: np.ndarray) -> None:
    for row, image in zip(out.numpy(), images):
        np.copyto(row, image.transpose(2, 0, 1))


def time_size(memory, size: int, args) -> None:
    from data import photo_like

    from dalle2_decoder.data.loader import unit_float_batch

    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(args.batch_size):
        buffer = io.BytesIO()
        photo_like(rng, size).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    images = np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in jpegs])
    shape = (args.batch_size, 3, size, size)
    pool = memory.SharedBatchPool(4)
    received = torch.empty(shape, dtype=torch.uint8).share_memory_()
    fill(received, images)

    def fresh_shared():
        out = torch.empty(shape, dtype=torch.uint8).share_memory_()
        fill(out, images)

    def fresh_shared_uncopied():
        # How torch's default_collate allocates batches in workers: straight in shared memory
        # (a private torch call, which is why the loader does not use it).
        storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(int(np.prod(shape)), device="cpu")
        fill(torch.empty(0, dtype=torch.uint8).new(storage).resize_(shape), images)

    def pooled_shared():
        out, (flags, index) = pool.acquire(shape, torch.uint8)
        fill(out, images)
        flags[index] = 0  # what the main process's release does

    def fresh_private():
        fill(torch.empty(shape, dtype=torch.uint8), images)

    def recycled_private():
        fill(memory.empty_batch(shape, torch.uint8), images)

    def copy_out():
        memory.copy_batch(received)

    def fresh_float():
        unit_float_batch(received)

    def recycled_float():
        memory.unit_float_batch(received, pin_memory=False)

    def decode():
        for data in jpegs:
            np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    variants = {
        "worker, fresh shared memory (this tree)": fresh_shared,
        "worker, fresh shared memory, default_collate's private call": fresh_shared_uncopied,
        "worker, pooled shared buffer (baseline)": pooled_shared,
        "main, fresh torch.empty (this tree)": fresh_private,
        "main, recycled huge pages (baseline)": recycled_private,
        "main, copy out of the pooled buffer (baseline, with workers)": copy_out,
        "main, float batch from a received one, fresh memory (this tree)": fresh_float,
        "main, float batch from a received one, recycled huge pages (baseline)": recycled_float,
        "PIL decode of the batch's JPEGs (both)": decode,
    }
    for variant in variants.values():  # warm: pools filled, allocators primed
        variant()
    times = {name: [] for name in variants}
    for round_number in range(args.rounds):
        names = list(variants) if round_number % 2 == 0 else list(reversed(variants))
        for name in names:
            start = time.perf_counter()
            variants[name]()
            times[name].append((time.perf_counter() - start) * 1000)
    print(f"{size}px ({np.prod(shape) / 2**20:.1f} MiB per batch):")
    for name, values in times.items():
        print(f"  {name}: {np.median(values):.2f} ms ({min(values):.2f}-{max(values):.2f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, help="a commit that has dalle2_decoder/data/memory.py")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 64])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        memory = load_memory_module(args.baseline, scratch)
        print(
            f"per batch of {args.batch_size} uint8 images, medians of {args.rounds} rounds (lowest-highest); "
            f"{os.cpu_count()} cores; baseline memory.py from {args.baseline}"
        )
        for size in args.sizes:
            time_size(memory, size, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
