"""Data loader throughput against the ceiling: plain JPEG decode + to-tensor on one core.

    python bench/data.py [--num-images 3000] [--image-size 256] [--workers 0 1 2] [--repeats 3] [--data DIR]

Writes a dataset of photo-like JPEGs (smooth colour fields plus grain, so they compress like
photos rather than like flat shapes) with embedding files, unless --data points at one written
before. Then, in one run:
- ceiling: 1000 of the JPEGs, already in memory, decoded and turned into float tensors in one
  process on one thread, with PIL + ToTensor (what the loader does) and with
  torchvision.io.decode_jpeg for comparison; the PIL one again right before and after every
  loader run;
- the loader: create_dataloaders over those shards (tar parsing, embedding lookup, batching,
  worker IPC and the main process's share included) for float and uint8 batches with each
  --workers count; samples/s and samples/s per worker (0 workers = the main process) as a
  fraction of the PIL ceiling measured around it. The target is at least 0.8 per worker.
Every measurement is repeated --repeats times, in rounds, and the medians are printed.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
import warnings

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
            writer.add(
                buffer.getvalue(), caption=f"image {i}", image_embed=rng.standard_normal(embed_dim).astype(np.float32)
            )


def jpeg_bytes_of(shard_dir: str) -> list:
    found = []
    for name in sorted(os.listdir(shard_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(shard_dir, name)) as archive:
                found += [archive.extractfile(m).read() for m in archive.getmembers() if m.name.endswith(".jpg")]
    return found


warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")


def pil_ceiling(jpegs: list) -> float:
    """Samples/s of PIL decode + ToTensor, one image at a time on one thread: the ceiling."""
    torch.set_num_threads(1)
    to_tensor = T.ToTensor()
    start = time.perf_counter()
    for data in jpegs:
        to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))
    return len(jpegs) / (time.perf_counter() - start)


def ceiling(jpegs: list, batch_size: int) -> dict:
    to_tensor = T.ToTensor()
    pil = pil_ceiling(jpegs)
    start = time.perf_counter()
    for data in jpegs:
        tvio.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)).float().div_(255)
    torchvision = len(jpegs) / (time.perf_counter() - start)
    # What any loader also pays: gathering the images into batch tensors (fresh memory each batch).
    start = time.perf_counter()
    for first in range(0, len(jpegs), batch_size):
        torch.stack(
            [to_tensor(Image.open(io.BytesIO(data)).convert("RGB")) for data in jpegs[first : first + batch_size]]
        )
    batched = len(jpegs) / (time.perf_counter() - start)
    return {"pil": pil, "torchvision": torchvision, "pil_batched": batched}


def loader_rate(data_dir: str, workers: int, batch_size: int, uint8_images: bool = False) -> dict:
    """Samples/s of one epoch: in steady state (from the first batch on) and including start-up."""
    config = DataConfig(
        webdataset_base_url=os.path.join(data_dir, "shards", "{}.tar"),
        img_embeddings_url=os.path.join(data_dir, "img_emb"),
        num_workers=workers,
        batch_size=batch_size,
        shuffle_train=True,
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
    parser.add_argument("--num-images", type=int, default=3000)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every measurement; medians are printed")
    parser.add_argument("--data", default=None, help="a folder written by an earlier run (skips writing)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data or scratch
        if not os.path.exists(os.path.join(data_dir, "shards")):
            write_bench_data(data_dir, args.num_images, args.image_size)
        jpegs = jpeg_bytes_of(os.path.join(data_dir, "shards"))
        print(
            f"{len(jpegs)} JPEGs of {args.image_size}px, mean {np.mean([len(j) for j in jpegs]) / 1024:.1f} KiB; "
            f"{os.cpu_count()} cores on this machine; medians of {args.repeats} rounds"
        )
        # float batches: the public default; uint8 batches: what the training loop asks for (it
        # scales them on its device, where that is free, and they are a quarter of the memory).
        runs = [(uint8, workers) for uint8 in (False, True) for workers in args.workers]
        ceilings, rates = [], {run: [] for run in runs}
        # The PIL ceiling is measured right before and right after every loader run: on a shared
        # machine the speed of a core drifts by 10-30% within minutes, and each ratio should
        # compare like with like.
        sample = jpegs[:1000]
        for _ in range(args.repeats):
            ceilings.append(ceiling(sample, args.batch_size))
            for run in runs:
                before = pil_ceiling(sample)
                rate = loader_rate(data_dir, run[1], args.batch_size, run[0])
                rates[run].append((rate, (before + pil_ceiling(sample)) / 2))
        median = lambda values: float(np.median(values))  # noqa: E731
        print(
            f"ceiling, one core: PIL decode + ToTensor {median([c['pil'] for c in ceilings]):.0f} samples/s; "
            f"torchvision.io.decode_jpeg + float {median([c['torchvision'] for c in ceilings]):.0f} samples/s; "
            f"PIL + ToTensor + torch.stack into batches of {args.batch_size} "
            f"{median([c['pil_batched'] for c in ceilings]):.0f} samples/s"
        )
        for (uint8_images, workers), measured in rates.items():
            steady = median([rate["steady"] for rate, _ in measured])
            ratio = median([rate["steady"] / max(1, workers) / pil for rate, pil in measured])
            print(
                f"loader ({'uint8' if uint8_images else 'float'} batches), {workers} worker(s): "
                f"{steady:.0f} samples/s steady, {steady / max(1, workers):.0f} per worker = "
                f"{ratio:.2f} of the PIL ceiling measured around it "
                f"({median([rate['with_startup'] for rate, _ in measured]):.0f} samples/s counting worker start-up)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
