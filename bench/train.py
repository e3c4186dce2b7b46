"""End-to-end training throughput of a config (the CPU demo by default), against its compute alone.

    python bench/train.py [--config example_configs/demo_cpu.json] [--steps 40] [--set key=value ...]

Runs the real training loop (data loading from the shards, CLIP if configured, the trainer,
logging) for `--steps` optimizer steps of one epoch and prints its samples/s. In the same process
it then times the baseline: the same trainer stepping on one batch already in memory, which is
what the hardware can do with no data pipeline or loop overhead. The ratio says how much of the
compute the loop delivers. Figures only: nothing here asserts a speed.

The demo config reads `demo_data/`: run `make demo-data` (or `python -m dalle2_decoder.data.demo
--out demo_data`) first.

Against the reference implementation, end to end (`--reference`):

    python bench/train.py --reference /work/refvenv/bin/python \
        --reference-script /work/reference_repo/train_decoder.py [--repeats 3] [--old-policy]

writes a 64px demo dataset and one JSON that both implementations accept (REFERENCE_JSON below: a
2-epoch 64px U-Net, 1 data worker, CPU), then runs `train_decoder.py --config_file` of each as a
user would, whole (start-up, data, training, validation, sampling, saving), alternating, `--repeats`
times, and prints the median wall time of each, the ratio (reference / ours: above 1 means ours is
faster) and the load average before each run (other processes on the machine disturb wall time).
`--old-policy` adds runs of ours with one compute thread (OMP_NUM_THREADS=1), what the former thread
policy chose for one worker on 2 cores.
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


REFERENCE_JSON = {
    "seed": 0,
    "decoder": {
        "unets": [{"dim": 16, "image_embed_dim": 64, "dim_mults": [1, 2, 4], "attn_dim_head": 16, "attn_heads": 2}],
        "image_sizes": [64],
        "channels": 3,
        "timesteps": 100,
        "loss_type": "l2",
        "beta_schedule": ["cosine"],
        "learned_variance": False,
    },
    "data": {
        "webdataset_base_url": "DATA/shards/{}.tar",
        "img_embeddings_url": "DATA/img_emb",
        "num_workers": 1,
        "batch_size": 16,
        "start_shard": 0,
        "end_shard": 11,
        "shard_width": 6,
        "index_width": 4,
        "splits": {"train": 0.75, "val": 0.125, "test": 0.125},
        "shuffle_train": False,
        "resample_train": False,
        "preprocessing": {"ToTensor": True},
    },
    "train": {
        "epochs": 2,
        "lr": 1e-4,
        "wd": 0.01,
        "max_grad_norm": 0.5,
        "save_every_n_samples": 100000,
        "n_sample_images": 2,
        "device": "cpu",
        "epoch_samples": 64,
        "validation_samples": 16,
        "use_ema": True,
        "ema_beta": 0.99,
        "amp": False,
        "unet_training_mask": [True],
    },
    "evaluate": {"n_evaluation_samples": 2},
    "tracker": {
        "data_path": "./tracker",
        "overwrite_data_path": True,
        "log": {"log_type": "console"},
        "load": {"load_from": None},
        "save": [{"save_to": "local", "save_latest_to": "latest.pth"}],
    },
}
"""The end-to-end comparison's config (`DATA` becomes the generated dataset's folder)."""


def _median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def against_reference(args) -> None:
    import subprocess

    from dalle2_decoder.data.demo import generate_demo_dataset

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as scratch:
        data = os.path.join(scratch, "data")
        generate_demo_dataset(data, num_images=1200, image_size=64, embed_dim=64, shard_size=100)
        config = os.path.join(scratch, "config.json")
        with open(config, "w") as handle:
            handle.write(json.dumps(REFERENCE_JSON, indent=2).replace("DATA/", data + "/"))
        runs = {
            "ours": [sys.executable, str(REPO / "train_decoder.py"), "--config_file", config],
            "reference": [args.reference, args.reference_script, "--config_file", config],
        }
        envs = {"ours": {}, "reference": {}}
        if args.old_policy:
            runs["ours, 1 thread (former policy)"] = runs["ours"]
            envs["ours, 1 thread (former policy)"] = {"OMP_NUM_THREADS": "1"}
        times = {name: [] for name in runs}
        loads = {name: [] for name in runs}
        for repeat in range(args.repeats):
            for name, command in runs.items():
                folder = os.path.join(scratch, f"run-{repeat}-{list(runs).index(name)}")
                os.makedirs(folder)
                env = {**os.environ, "PYTHONPATH": str(REPO), **envs[name]}
                if name == "reference":
                    env.pop("PYTHONPATH")
                loads[name].append(round(os.getloadavg()[0], 2))
                start = time.perf_counter()
                result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
                took = time.perf_counter() - start
                if result.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
                times[name].append(round(took, 1))
                print(f"{name}: {took:.1f} s (load before {loads[name][-1]})", file=sys.stderr, flush=True)
    medians = {name: _median(values) for name, values in times.items()}
    print(
        json.dumps(
            {
                "config": "REFERENCE_JSON in bench/train.py (64px U-Net dim 16, 2 epochs of 64 samples, 1 worker, CPU)",
                "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                "wall_seconds": times,
                "median_seconds": medians,
                "load_average_before_each_run": loads,
                "ratio_reference_over_ours": round(medians["reference"] / medians["ours"], 3),
            },
            indent=2,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "example_configs" / "demo_cpu.json"))
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps timed in each measurement")
    parser.add_argument("--warmup", type=int, default=5, help="steps before timing starts")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--reference", metavar="PYTHON", help="the reference's interpreter: compare end to end")
    parser.add_argument(
        "--reference-script", default="/work/reference_repo/train_decoder.py", help="the reference's train_decoder.py"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each implementation (medians count)")
    parser.add_argument("--old-policy", action="store_true", help="also run ours with one compute thread")
    args = parser.parse_args()
    if args.reference:
        against_reference(args)
        return

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
        raw["train"].update(
            epochs=1, epoch_samples=total_steps * batch_size, save_every_n_samples=10**12, validation_samples=batch_size
        )
        raw["train"].pop("warmup_steps", None)  # a timed run of a few dozen steps: no warm-up to wait through
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

    print(
        json.dumps(
            {
                "config": os.path.relpath(args.config, REPO),
                "device": str(run.accelerator.device),
                "threads": torch.get_num_threads(),
                "batch_size": batch_size,
                "timed_steps": args.steps,
                "end_to_end_samples_per_s": round(loop_rate, 2),
                "compute_only_samples_per_s": round(compute_rate, 2),
                "ratio_end_to_end_over_compute": round(loop_rate / compute_rate, 3),
                "whole_run_seconds_incl_setup_validation_sampling": round(wall, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
