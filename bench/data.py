"""Data loader throughput against the ceiling: plain JPEG decode + to-tensor on one core.

    python bench/data.py [--num-images 1000] [--image-size 256] [--workers 0 1 2] [--data DIR]

Writes a dataset of photo-like JPEGs (smooth colour fields plus grain, so they compress like
photos rather than like flat shapes) with embedding files, unless --data points at one written
before. Then, in one run:
- ceiling: the same JPEG bytes, already in memory, decoded and turned into float tensors in one
  process on one thread, with PIL + ToTensor (what the loader does) and with
  torchvision.io.decode_jpeg for comparison;
- the loader: create_dataloaders over those shards (embedding lookup, batching, worker IPC
  included) with each --workers count; samples/s and samples/s per worker (0 workers = the main
  process) as a fraction of the PIL ceiling. The target is at least 0.8 per worker.
"""
from __future__ import annotations

import argparse
import io
import warnings
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torchvision import io as tvio
from torchvision import transforms as T

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dalle2_decoder.config import DataConfig, DataSplits  # noqa: E402
from dalle2_decoder.data import create_dataloaders  # noqa: E402
from dalle2_decoder.data.writer import ShardSetWriter  # noqa: E402


def photo_like(rng: np.random.Generator, size: int) -> Image.Image:
    coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    grain = rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8))


def write_bench_data(out: str, num_images: int, size: int, embed_dim: int = 512) -> None:
    rng = np.random.default_rng(0)
    with ShardSetWriter(out, shard_size=250) as writer:
        for i in range(num_images):
            buffer = io.BytesIO()
            photo_like(rng, size).save(buffer, format="JPEG", quality=90)
            writer.add(buffer.getvalue(), caption=f"image {i}",
                       image_embed=rng.standard_normal(embed_dim).astype(np.float32))


def jpeg_bytes_of(shard_dir: str) -> list:
    found = []
    for name in sorted(os.listdir(shard_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(shard_dir, name)) as archive:
                found += [archive.extractfile(m).read() for m in archive.getmembers() if m.name.endswith(".jpg")]
    return found


warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")


def ceiling(jpegs: list, batch_size: int) -> dict:
    torch.set_num_threads(1)
    to_tensor = T.ToTensor()
    start = time.perf_counter()
    for data in jpegs:
        to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))
    pil = len(jpegs) / (time.perf_counter() - start)
    start = time.perf_counter()
    for data in jpegs:
        tvio.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)).float().div_(255)
    torchvision = len(jpegs) / (time.perf_counter() - start)
    # What any loader also pays: gathering the images into batch tensors (fresh memory each batch).
    start = time.perf_counter()
    for first in range(0, len(jpegs), batch_size):
        torch.stack([to_tensor(Image.open(io.BytesIO(data)).convert("RGB")) for data in jpegs[first:first + batch_size]])
    batched = len(jpegs) / (time.perf_counter() - start)
    return {"pil": pil, "torchvision": torchvision, "pil_batched": batched}


def loader_rate(data_dir: str, workers: int, batch_size: int, uint8_images: bool = False) -> dict:
    """Samples/s of one epoch: in steady state (from the first batch on) and including start-up."""
    config = DataConfig(
        webdataset_base_url=os.path.join(data_dir, "shards", "{}.tar"),
        img_embeddings_url=os.path.join(data_dir, "img_emb"),
        num_workers=workers, batch_size=batch_size, shuffle_train=True,
        splits=DataSplits(train=1.0, val=0.0, test=0.0),
    )
    loader = create_dataloaders(config, seed=0, uint8_images=uint8_images)["train"]
    start = time.perf_counter()
    iterator = iter(loader)
    first = len(next(iterator)["key"])
    steady_start = time.perf_counter()
    rest = sum(len(batch["key"]) for batch in iterator)
    end = time.perf_counter()
    # Worker processes start per epoch; the steady rate is what a long epoch runs at.
    return {"steady": rest / (end - steady_start), "with_startup": (first + rest) / (end - start)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data", default=None, help="a folder written by an earlier run (skips writing)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data or scratch
        if not os.path.exists(os.path.join(data_dir, "shards")):
            write_bench_data(data_dir, args.num_images, args.image_size)
        jpegs = jpeg_bytes_of(os.path.join(data_dir, "shards"))
        print(f"{len(jpegs)} JPEGs of {args.image_size}px, mean {np.mean([len(j) for j in jpegs]) / 1024:.1f} KiB; "
              f"{os.cpu_count()} cores on this machine")
        ceilings = ceiling(jpegs, args.batch_size)
        print(f"ceiling, one core: PIL decode + ToTensor {ceilings['pil']:.0f} samples/s; "
              f"torchvision.io.decode_jpeg + float {ceilings['torchvision']:.0f} samples/s; "
              f"PIL + ToTensor + torch.stack into batches of {args.batch_size} {ceilings['pil_batched']:.0f} samples/s")
        # float batches: the public default; uint8 batches: what the training loop asks for (it
        # scales them on its device, where that is free, and they are a quarter of the memory).
        for uint8_images in (False, True):
            for workers in args.workers:
                rates = loader_rate(data_dir, workers, args.batch_size, uint8_images)
                per_worker = rates["steady"] / max(1, workers)
                print(f"loader ({'uint8' if uint8_images else 'float'} batches), {workers} worker(s): "
                      f"{rates['steady']:.0f} samples/s steady, {per_worker:.0f} per worker = "
                      f"{per_worker / ceilings['pil']:.2f} of the PIL ceiling "
                      f"({rates['with_startup']:.0f} samples/s counting worker start-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
