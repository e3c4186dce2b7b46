"""End-to-end training throughput of a config (the CPU demo by default), against its compute alone.

    python bench/train.py [--config example_configs/demo_cpu.json] [--steps 40] [--set key=value ...]

Runs the real training loop (data loading from the shards, CLIP if configured, the trainer,
logging) for `--steps` optimizer steps of one epoch and prints its samples/s. In the same process
it then times the baseline: the same trainer stepping on one batch already in memory, which is
what the hardware can do with no data pipeline or loop overhead. The ratio says how much of the
compute the loop delivers. Figures only: nothing here asserts a speed.

The demo config reads `demo_data/`: run `make demo-data` (or `python -m dalle2_decoder.data.demo
--out demo_data`) first.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "example_configs" / "demo_cpu.json"))
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps timed in each measurement")
    parser.add_argument("--warmup", type=int, default=5, help="steps before timing starts")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    import torch

    from dalle2_decoder.cli import load_config, parse_override
    from dalle2_decoder.training.loop import TrainingRun

    overrides = [parse_override(item) for item in args.overrides]
    config, _ = load_config(args.config, overrides)
    raw = config.to_dict()
    batch_size = raw["data"]["batch_size"]
    total_steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as scratch:
        # One epoch just long enough; no periodic saves or grids inside the timed window.
        raw["train"].update(epochs=1, epoch_samples=total_steps * batch_size, save_every_n_samples=10**12,
                            validation_samples=batch_size)
        raw["tracker"].update(data_path=os.path.join(scratch, "run"), overwrite_data_path=True)
        raw["tracker"]["log"]["auto_resume"] = False
        from dalle2_decoder.config import TrainDecoderConfig

        config = TrainDecoderConfig.from_dict(raw)
        run = TrainingRun(config)
        stamps = []
        original_step = run.trainer.train_step

        def timed_step(batch):
            losses = original_step(batch)
            stamps.append(time.perf_counter())
            return losses

        run.trainer.train_step = timed_step
        start = time.perf_counter()
        run.execute()
        wall = time.perf_counter() - start
        loop_rate = args.steps * batch_size / (stamps[-1] - stamps[args.warmup - 1])

        # Baseline: the same trainer on one in-memory batch, nothing else.
        batch = run.batches.prepare(next(iter(run.loaders["train"])))
        for _ in range(args.warmup):
            original_step(batch)
        begin = time.perf_counter()
        for _ in range(args.steps):
            original_step(batch)
        compute_rate = args.steps * batch_size / (time.perf_counter() - begin)

    print(json.dumps({
        "config": os.path.relpath(args.config, REPO),
        "device": str(run.accelerator.device),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "timed_steps": args.steps,
        "end_to_end_samples_per_s": round(loop_rate, 2),
        "compute_only_samples_per_s": round(compute_rate, 2),
        "ratio_end_to_end_over_compute": round(loop_rate / compute_rate, 3),
        "whole_run_seconds_incl_setup_validation_sampling": round(wall, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
