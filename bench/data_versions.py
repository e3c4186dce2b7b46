"""The data loader of this tree against the loader of another commit, in one run.

    python bench/data_versions.py --baseline REF [--sizes 256 64] [--workers 0 1 2] [--pin-memory off on]
                                  [--uint8 on] [--rounds 5] [--batch-size 64] [--epochs 2] [--data DIR]

Written to decide whether a change to the loader (here: removing `data/memory.py`, its recycled
huge-page batch memory and pooled worker buffers) costs or gains throughput in the settings the
training loop runs: uint8 batches of 64, 256px and 64px images, 0/1/2 workers, pin_memory as on
a GPU (on) and as on a CPU (off).

`git archive REF dalle2_decoder` gives the baseline package. Every measurement runs in a fresh
process (so neither version inherits the other's allocator state) that imports one of the two
packages, builds the loader with `create_dataloaders` and reads `--epochs` epochs, touching every
page of each batch once as a copy to the device would; the rate is the last epoch's, from its
first batch on (worker start-up excluded, pools and allocators warm). The two versions alternate
within each round, and which goes first alternates between rounds, because on a shared machine
a core's speed drifts within minutes. Printed per setting: each version's median samples/s and
the median of the per-round ratios (tree / baseline) with their lowest and highest.

pin_memory on needs a CUDA device (torch cannot page-lock memory without a driver); on a machine
without one those settings are skipped, and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def measure(data_dir: str, workers: int, batch_size: int, uint8: bool, pin: bool, epochs: int) -> dict:
    """One loader run in this process (the package on sys.path): the last epoch's samples/s."""
    import torch

    from dalle2_decoder.config import DataConfig, DataSplits
    from dalle2_decoder.data import create_dataloaders

    config = DataConfig(
        webdataset_base_url=os.path.join(data_dir, "shards", "{}.tar"),
        img_embeddings_url=os.path.join(data_dir, "img_emb"),
        num_workers=workers,
        batch_size=batch_size,
        shuffle_train=True,
        splits=DataSplits(train=1.0, val=0.0, test=0.0),
    )
    loader = create_dataloaders(config, seed=0, uint8_images=uint8, pin_memory=pin)["train"]
    result = {}
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        cpu_start = os.times()
        iterator = iter(loader)
        first = len(next(iterator)["key"])
        start = time.perf_counter()
        samples = 0
        for batch in iterator:
            image = batch["image"]
            # One read per 4 KiB page: what a copy to the device costs in page faults, no more.
            int(image.view(-1).view(torch.uint8)[::4096].sum())
            samples += len(batch["key"])
        elapsed = time.perf_counter() - start
        del iterator  # workers exit and are waited for, so their CPU time is counted below
        cpu_end = os.times()
        # CPU time of this process and its (finished) workers over the whole epoch, start-up
        # included: unlike wall time, it hardly moves when other jobs share the cores.
        cpu = sum(cpu_end[:4]) - sum(cpu_start[:4])
        result = {"samples_per_s": samples / elapsed, "cpu_ms_per_sample": 1000 * cpu / (samples + first)}
    return result


def extract(ref: str, into: str) -> str:
    """The `dalle2_decoder` package of commit `ref`, unpacked under `into`; returns `into`."""
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", "--format=tar", ref, "dalle2_decoder"], check=True, capture_output=True
    ).stdout
    with tempfile.TemporaryFile() as tmp:
        tmp.write(archive)
        tmp.seek(0)
        with tarfile.open(fileobj=tmp) as tar:
            tar.extractall(into, filter="data")
    return into


def run_one(package_root: str, data_dir: str, args, workers: int, uint8: bool, pin: bool) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--measure",
        f"--data={data_dir}",
        f"--workers={workers}",
        f"--batch-size={args.batch_size}",
        f"--epochs={args.epochs}",
        f"--uint8={'on' if uint8 else 'off'}",
        f"--pin-memory={'on' if pin else 'off'}",
    ]
    env = dict(os.environ, PYTHONPATH=package_root)
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", help="git commit (or branch) whose loader is the baseline")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 64])
    parser.add_argument("--num-images", type=int, nargs="+", default=None, help="per size (default 2000 / 6000)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pin-memory", nargs="+", choices=["on", "off"], default=["off", "on"])
    parser.add_argument("--uint8", nargs="+", choices=["on", "off"], default=["on"], help="uint8 batches")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="per measurement; the last one is timed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data", default=None, help="with --measure: the dataset folder")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        result = measure(
            args.data, args.workers[0], args.batch_size, args.uint8[0] == "on", args.pin_memory[0] == "on", args.epochs
        )
        print(json.dumps(result))
        return 0
    if not args.baseline:
        parser.error("--baseline is required")

    import torch
    from data import write_bench_data

    pins = [pin == "on" for pin in args.pin_memory]
    if True in pins and not torch.cuda.is_available():
        print("pin_memory on: skipped, this machine has no CUDA device (torch cannot page-lock memory without one)")
        pins = [pin for pin in pins if not pin]
    counts = args.num_images or [2000 if size >= 128 else 6000 for size in args.sizes]
    commit = subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "--short", args.baseline], check=True, capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as scratch:
        # Both packages are copied once, so edits to the tree while the bench runs change nothing.
        tree_root = os.path.join(scratch, "tree")
        shutil.copytree(os.path.join(ROOT, "dalle2_decoder"), os.path.join(tree_root, "dalle2_decoder"))
        versions = {"tree": tree_root, "baseline": extract(args.baseline, os.path.join(scratch, "baseline"))}
        data_dirs = {}
        for size, count in zip(args.sizes, counts):
            data_dirs[size] = os.path.join(scratch, f"data{size}")
            write_bench_data(data_dirs[size], count, size)
        settings = [
            (size, uint8, pin, workers)
            for size in args.sizes
            for uint8 in (value == "on" for value in args.uint8)
            for pin in pins
            for workers in args.workers
        ]
        rates: Dict[tuple, Dict[str, List[dict]]] = {s: {"tree": [], "baseline": []} for s in settings}
        print(
            f"tree {ROOT} (as it was at the start) against baseline {args.baseline} ({commit}); "
            f"batches of {args.batch_size}; {os.cpu_count()} cores; {args.rounds} rounds, versions alternating; "
            f"last of {args.epochs} epochs measured",
            flush=True,
        )

        def ratios(measured: Dict[str, List[dict]], key: str) -> List[float]:
            return [t[key] / b[key] for t, b in zip(measured["tree"], measured["baseline"])]

        def name(setting: tuple) -> str:
            size, uint8, pin, workers = setting
            return f"{size}px/{'uint8' if uint8 else 'float'}/pin {'on' if pin else 'off'}/{workers}w"

        for round_number in range(args.rounds):
            order = ["tree", "baseline"] if round_number % 2 == 0 else ["baseline", "tree"]
            for setting in settings:
                size, uint8, pin, workers = setting
                for version in order:
                    rates[setting][version].append(
                        run_one(versions[version], data_dirs[size], args, workers, uint8, pin)
                    )
            line = ", ".join(
                f"{name(s)} {ratios(rates[s], 'samples_per_s')[-1]:.3f} / "
                f"{ratios(rates[s], 'cpu_ms_per_sample')[-1]:.3f}"
                for s in settings
            )
            print(f"round {round_number + 1} of {args.rounds}, tree / baseline (samples/s / CPU): {line}", flush=True)
        print(
            "\nsamples/s: wall clock, steady state; CPU: ms of CPU time (main process and workers) per sample;\n"
            "ratios tree / baseline: median of the rounds (lowest-highest); samples/s > 1 and CPU < 1 favour the tree\n"
        )
        print("| setting | samples/s tree | baseline | ratio | CPU ms/sample tree | baseline | ratio |")
        print("|---|---|---|---|---|---|---|")
        for setting, measured in rates.items():
            cells = []
            for key in ("samples_per_s", "cpu_ms_per_sample"):
                values = ratios(measured, key)
                cells += [
                    f"{np.median([m[key] for m in measured['tree']]):.{0 if key == 'samples_per_s' else 3}f}",
                    f"{np.median([m[key] for m in measured['baseline']]):.{0 if key == 'samples_per_s' else 3}f}",
                    f"{np.median(values):.3f} ({min(values):.3f}-{max(values):.3f})",
                ]
            print(f"| {name(setting)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
