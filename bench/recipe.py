"""Which training recipe gives the better decoder for the same training samples: variants x seeds, scored.

    python bench/recipe.py [--settings 32 64 up] [--variants reference recipe ...] [--seeds 0 1 2]
        [--samples 3000] [--test-images 48] [--jobs 2] [--output .tracker-data/bench_recipe.json]

Each setting is one small decoder on the demo shapes (a 64px demo dataset written once under
`--data`): `32` a 32px base U-Net, `64` the same U-Net at 64px, `up` a 32 -> 64 upsampler trained
alone (the base U-Net of its cascade frozen and unused). Each variant is a set of config changes
(VARIANTS below, each with the paper it comes from); `reference` changes nothing, which is
DALLE2-pytorch's behaviour. Every (setting, variant, seed) trains with `train_decoder.py` in its
own process, as a user runs it, for exactly `--samples` training samples (one epoch of that many),
and is then scored on the first `--test-images` images of the test split, the same images and the
same sampling noise (one seed per image) for every run:

- paired_rmse / paired_rmse_coarse: the fidelity metric of the evaluation
  (`dalle2_decoder.evaluation.fidelity.paired_errors`): RMSE to the true image at full scale and
  after area-downsampling both to 8x8 (colour and layout). The base settings sample from the image
  embedding; the upsampler from the true image downsampled to 32px;
- wall time: the training process's seconds per training sample (`train/samples_per_s` averaged
  over its log lines, so start-up and the final save do not count) and the process's whole time.

Sampling-time choices (`--cond-scales`, `--samplers`) score the same trained weights again;
`--ema-lengths` trains with two post-hoc EMA profiles (`train.posthoc_ema_sigma_rels` 0.05 and
0.10, about 10 snapshots per run) and scores the EMA of each length asked for, made after training
(`dalle2_decoder.posthoc_ema`), beside the run's own EMA; `--reuse` scores finished runs again.
Runs of different variants interleave (seed-major), so load from other work spreads over them.
Printed: one JSON line per run as it ends, then a table per setting: mean and standard deviation
over seeds, and each variant's ratio to `reference` (below 1: lower error). Nothing here asserts.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

UNET = {"dim": 16, "image_embed_dim": 64, "dim_mults": [1, 2, 4], "attn_dim_head": 16, "attn_heads": 2}
UPSAMPLER = {"dim": 16, "dim_mults": [1, 2, 4], "attn_dim_head": 16, "attn_heads": 2}


def base_config(setting: str, data: str, samples: int, seed: int) -> Dict[str, Any]:
    """The 32px demo's decoder and training settings (example_configs/demo_cpu.json before its 16px U-Net;
    fixed here so that every table in docs/RECIPE.md compares the same networks) at one setting's size."""
    size = 32 if setting == "32" else 64
    decoder: Dict[str, Any] = {"timesteps": 100, "learned_variance": False}
    train: Dict[str, Any] = {"lr": 1e-3, "ema_beta": 0.99}
    if setting == "up":
        decoder.update(unets=[UNET, UPSAMPLER], image_sizes=[32, 64])
        train["unet_training_mask"] = [False, True]
    else:
        decoder.update(unets=[UNET], image_sizes=[size])
    return {
        "seed": seed,
        "decoder": decoder,
        "data": {
            "webdataset_base_url": f"{data}/shards/{{}}.tar",
            "img_embeddings_url": f"{data}/img_emb",
            "num_workers": 1,
            "batch_size": 16,
            "start_shard": 0,
            "end_shard": 7,
            "shard_width": 6,
            "index_width": 4,
            "splits": {"train": 0.75, "val": 0.125, "test": 0.125},
            "preprocessing": {"Resize": {"size": size}, "ToTensor": True},
        },
        "train": {
            **train,
            "epochs": 1,
            "device": "cpu",
            "epoch_samples": samples,
            "validation_samples": 16,
            "save_every_n_samples": 10**9,
            "n_sample_images": 1,
        },
        "tracker": {
            "data_path": "RUN",
            "overwrite_data_path": True,
            "log": {"log_type": "console", "auto_resume": False},
            "save": [{"save_to": "local", "save_latest_to": "latest.pth"}],
        },
    }


# name -> (what it is and where it comes from, {dotted config path: value}, settings it applies to)
VARIANTS: Dict[str, tuple] = {
    "reference": ("DALLE2-pytorch's behaviour (the demo's settings)", {}, ("32", "64", "up")),
    "min_snr": (
        "Min-SNR-5 loss weighting (Hang et al. 2023, 'Efficient Diffusion Training via Min-SNR Weighting')",
        {"decoder.min_snr_loss_weight": True},
        ("32", "64", "up"),
    ),
    "v_pred": (
        "v-prediction (Salimans & Ho 2022, 'Progressive Distillation')",
        {"decoder.predict_v": True},
        ("32", "64", "up"),
    ),
    "shifted": (
        "noise schedule shifted for 64px from the 32px one (Hoogeboom et al. 2023, 'simple diffusion')",
        {"decoder.noise_schedule_shift": 0.5},
        ("64", "up"),
    ),
    "v_pred_shifted": (
        "v-prediction and the schedule shifted for 64px together",
        {"decoder.predict_v": True, "decoder.noise_schedule_shift": 0.5},
        ("64", "up"),
    ),
    "lr_cosine": (
        "cosine learning-rate decay to 0 over the run (Loshchilov & Hutter 2017, 'SGDR')",
        {"train.lr_schedule": "cosine"},
        ("32", "64", "up"),
    ),
    "v_pred_cosine": (
        "v-prediction and the cosine learning-rate decay together",
        {"decoder.predict_v": True, "train.lr_schedule": "cosine"},
        ("32", "64", "up"),
    ),
    "ema_0999": ("a longer EMA: beta 0.999 instead of 0.99", {"train.ema_beta": 0.999}, ("32", "64", "up")),
    "ema_095": ("a shorter EMA: beta 0.95 instead of 0.99", {"train.ema_beta": 0.95}, ("32", "64", "up")),
}


def set_path(config: Dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def variant_config(setting: str, variant: str, data: str, samples: int, seed: int) -> Dict[str, Any]:
    config = base_config(setting, data, samples, seed)
    for path, value in VARIANTS[variant][1].items():
        if path == "decoder.noise_schedule_shift" and setting == "up":
            value = [1.0, value]  # the upsampler only: the frozen 32px base keeps its schedule
        set_path(config, path, copy.deepcopy(value))
    return config


def train(config: Dict[str, Any], folder: Path, threads: int, reuse: bool = False) -> Dict[str, float]:
    """Runs train_decoder.py on `config` in `folder`; wall seconds and mean training samples/s.

    With `reuse`, a finished run of the same config already in `folder` is scored again instead
    (its process wall time was not kept: NaN)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config)
    config["tracker"]["data_path"] = str(folder / "run")
    path = folder / "config.json"
    if reuse and (folder / "run" / "latest.pth").exists() and path.exists():
        if json.loads(path.read_text()) != config:
            raise SystemExit(f"--reuse: {path} holds a different config than this run's; remove {folder} to retrain")
        return {"wall_s": float("nan"), "samples_per_s": _mean_rate(folder)}
    path.write_text(json.dumps(config, indent=2))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(REPO / "train_decoder.py"), "--config_file", str(path)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"training in {folder} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return {"wall_s": round(wall, 1), "samples_per_s": _mean_rate(folder)}


def _mean_rate(folder: Path) -> float:
    """The run's `train/samples_per_s` averaged over its log lines (start-up and saves excluded)."""
    rates = []
    for line in (folder / "run" / "metrics.jsonl").read_text().splitlines():
        rate = json.loads(line).get("train/samples_per_s")
        if rate:
            rates.append(rate)
    return statistics.fmean(rates) if rates else float("nan")


def test_inputs(config_dict: Dict[str, Any], count: int):
    """The first `count` test images (in [0, 1], the setting's size) and their image embeddings."""
    import torch

    from dalle2_decoder.config import TrainDecoderConfig
    from dalle2_decoder.data import create_dataloaders
    from dalle2_decoder.training.batches import BatchPreparer

    config = TrainDecoderConfig.from_dict(config_dict)
    loader = create_dataloaders(
        config.data, seed=0, validation_samples=None, test_samples=None, image_embed_dim=UNET["image_embed_dim"]
    )["test"]
    prepare = BatchPreparer(config, device=torch.device("cpu")).prepare
    embeds, images = [], []
    for batch in loader:
        batch = prepare(batch)
        embeds.append(batch["image_embed"])
        images.append(batch["image"].float())
        if sum(len(e) for e in embeds) >= count:
            break
    return torch.cat(embeds)[:count], torch.cat(images)[:count]


def score(model: Path, setting: str, inputs, *, cond_scale: float, sampler: Optional[str], steps: Optional[int]):
    """Paired errors of the run's EMA decoder on the test inputs (one noise seed per image)."""
    import torch

    from dalle2_decoder.evaluation.fidelity import paired_errors
    from dalle2_decoder.loading import load

    embed, images = inputs
    decoder = load(str(model)).decoder
    start = 2 if setting == "up" else 1
    out = []
    with torch.no_grad():
        for first in range(0, embed.shape[0], 16):
            rows = slice(first, first + 16)
            out.append(
                decoder.sample(
                    image_embed=embed[rows],
                    image=images[rows] if start == 2 else None,
                    start_at_unet_number=start,
                    cond_scale=cond_scale if start == 1 else 1.0,
                    seed=list(range(first, first + embed[rows].shape[0])),
                    sampler=sampler,
                    sample_timesteps=steps,
                ).clamp(0, 1)
            )
    errors = paired_errors(torch.cat(out).float(), images)
    return {name: float(values.mean()) for name, values in errors.items()}


def summarise(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean and spread over seeds per (setting, variant, sampling), with ratios to the reference's mean."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["setting"], row["variant"], row["sampling"]), []).append(row)
    table = []
    for (setting, variant, sampling), runs in sorted(groups.items()):
        entry: Dict[str, Any] = {"setting": setting, "variant": variant, "sampling": sampling, "seeds": len(runs)}
        for key in ("paired_rmse", "paired_rmse_coarse", "s_per_sample"):
            values = [run[key] for run in runs]
            entry[key] = statistics.fmean(values)
            entry[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(entry)
    for entry in table:
        base = [
            e
            for e in table
            if (e["setting"], e["variant"], e["sampling"]) == (entry["setting"], "reference", entry["sampling"])
        ]
        if base:
            for key in ("paired_rmse", "paired_rmse_coarse", "s_per_sample"):
                entry[key + "_ratio"] = entry[key] / base[0][key]
    return table


def print_table(table: List[Dict[str, Any]]) -> None:
    print("| setting | variant | sampling | seeds | paired RMSE | ratio | coarse RMSE | ratio | s/sample | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for e in table:
        print(
            f"| {e['setting']} | {e['variant']} | {e['sampling']} | {e['seeds']} "
            f"| {e['paired_rmse']:.4f} ± {e['paired_rmse_sd']:.4f} | {e.get('paired_rmse_ratio', float('nan')):.2f} "
            f"| {e['paired_rmse_coarse']:.4f} ± {e['paired_rmse_coarse_sd']:.4f} "
            f"| {e.get('paired_rmse_coarse_ratio', float('nan')):.2f} "
            f"| {e['s_per_sample']:.4f} ± {e['s_per_sample_sd']:.4f} "
            f"| {e.get('s_per_sample_ratio', float('nan')):.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=["32", "64", "up"], choices=["32", "64", "up"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=3000, help="training samples of every run")
    parser.add_argument("--test-images", type=int, default=48)
    parser.add_argument("--cond-scales", nargs="+", type=float, default=[1.0])
    parser.add_argument(
        "--samplers", nargs="+", default=["ddpm"], help="sampler[:steps] to score with, e.g. ddpm ddim:20 dpmpp_2m:20"
    )
    parser.add_argument(
        "--ema-lengths",
        nargs="+",
        type=float,
        default=[],
        metavar="SIGMA_REL",
        help="also score post-hoc EMAs of these lengths (EDM2's sigma_rel), made after training from two profiles",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="score a finished run of the same config in --work again instead of retraining it (new samplings)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each with --threads compute threads)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default=".tracker-data/recipe-data", help="the demo dataset (written if absent)")
    parser.add_argument("--work", default=".tracker-data/recipe-runs")
    parser.add_argument("--output", default=".tracker-data/bench_recipe.json")
    args = parser.parse_args()

    import torch

    from dalle2_decoder.data.demo import generate_demo_dataset

    torch.set_num_threads(max(1, args.threads * args.jobs))
    data = Path(args.data).resolve()
    if not (data / "shards").is_dir():
        generate_demo_dataset(str(data), num_images=4000, image_size=64, embed_dim=64, shard_size=500)
    work = Path(args.work).resolve()
    runs = [
        (setting, variant, seed)
        for seed in args.seeds
        for setting in args.settings
        for variant in args.variants
        if setting in VARIANTS[variant][2]
    ]
    inputs = {s: test_inputs(base_config(s, str(data), args.samples, 0), args.test_images) for s in args.settings}
    samplings = [(scale, name) for scale in args.cond_scales for name in args.samplers]
    from dalle2_decoder.posthoc_ema import write_model

    def one(run):
        setting, variant, seed = run
        folder = work / f"{setting}-{variant}-seed{seed}"
        config = variant_config(setting, variant, str(data), args.samples, seed)
        if args.ema_lengths:
            # Two power-function profiles (EDM2's 0.05 and 0.10) snapshotted about 10 times per run.
            steps = max(1, args.samples // config["data"]["batch_size"])
            set_path(config, "train.posthoc_ema_sigma_rels", [0.05, 0.1])
            set_path(config, "train.posthoc_ema_every_n_steps", max(1, steps // 10))
        timing = train(config, folder, args.threads, reuse=args.reuse)
        # The run's own EMA (train.ema_beta), then each post-hoc EMA length asked for.
        models = [("", folder / "run" / "latest.pth")]
        for sigma_rel in args.ema_lengths:
            out = folder / f"posthoc-ema-{sigma_rel:g}.safetensors"
            write_model(folder / "run", sigma_rel, out)
            models.append((f" posthoc-ema {sigma_rel:g}", out))
        results = []
        for (scale, name), (ema_label, model) in [(s, m) for s in samplings for m in models]:
            sampler, _, steps = name.partition(":")
            errors = score(
                model,
                setting,
                inputs[setting],
                cond_scale=scale,
                sampler=sampler,
                steps=int(steps) if steps else None,
            )
            row = {
                "setting": setting,
                "variant": variant,
                "seed": seed,
                "sampling": f"{name} cfg {scale:g}{ema_label}",
                **errors,
                "s_per_sample": 1.0 / timing["samples_per_s"],
                "process_wall_s": timing["wall_s"],
                "load_average": round(os.getloadavg()[0], 2),
            }
            print(json.dumps(row), flush=True)
            results.append(row)
        return results

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = [row for result in pool.map(one, runs) for row in result]
    table = summarise(rows)
    print_table(table)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"args": vars(args), "runs": rows, "table": table}, indent=2))
    print(f"results: {output}")


if __name__ == "__main__":
    main()
