"""What post-hoc EMA costs: its per-step update next to a training step, a snapshot write, and the
fit after training.

    python bench/posthoc_ema.py [--profiles 2] [--steps 5] [--device cpu|cuda] [--threads N]
                                [--fit-updates 1000000] [--fit-snapshots 200]

For the CPU demo U-Net (example_configs/demo_cpu.json's first U-Net when it exists, else a
demo-like one) it prints: one training step of the trainer (forward, backward, AdamW, the usual
EMA) without and with `--profiles` power-function profiles (their updates run after every step),
the time to write one snapshot of every profile, and the size of the snapshot files; then the time
of the least-squares fit for a run of `--fit-updates` EMA updates with `--fit-snapshots` snapshots
(two profiles, evenly spaced), which works through the time axis in chunks. Figures only: nothing
here asserts a speed. Best of 3 repeats; the profiles' update is also timed alone, as the step
timings on a shared machine vary more than it costs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dalle2_decoder.config import DecoderConfig, TrainConfig  # noqa: E402
from dalle2_decoder.config.structure import structure_at  # noqa: E402
from dalle2_decoder.training.posthoc_ema import Profile, fit_profiles, gamma_from_sigma_rel  # noqa: E402
from dalle2_decoder.training.trainer import DecoderTrainer  # noqa: E402

DEMO_CONFIG = REPO / "example_configs" / "demo_cpu.json"


def demo_decoder():
    if DEMO_CONFIG.exists():
        raw = json.loads(DEMO_CONFIG.read_text())
        decoder_raw = dict(raw["decoder"])
        decoder_raw["unets"] = decoder_raw["unets"][:1]
        for key, value in list(decoder_raw.items()):
            if isinstance(value, list) and key != "unets":
                decoder_raw[key] = value[:1]
        decoder_raw.pop("clip", None)
        config, problems = structure_at(decoder_raw, DecoderConfig, "decoder")
        if config is not None and not problems:
            return config.create(), raw.get("data", {}).get("batch_size", 8)
    config, _ = structure_at(
        {"unets": [{"dim": 16, "image_embed_dim": 64, "dim_mults": [1, 2, 4]}], "image_sizes": [32], "timesteps": 1000},
        DecoderConfig,
        "decoder",
    )
    return config.create(), 8


def time_steps(trainer, batch, steps: int) -> float:
    trainer.train_step(batch)  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(batch)
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fit-updates", type=int, default=1_000_000)
    parser.add_argument("--fit-snapshots", type=int, default=200)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=args.device == "cpu")
    decoder, batch_size = demo_decoder()
    unet = decoder.unets[0]
    size = decoder.image_sizes[0] if hasattr(decoder, "image_sizes") else 32
    generator = torch.Generator().manual_seed(0)
    embed_dim = unet.image_embed_dim if hasattr(unet, "image_embed_dim") else 64
    batch = {
        "image": torch.rand(batch_size, 3, size, size, generator=generator).to(accelerator.device),
        "image_embed": torch.randn(batch_size, embed_dim, generator=generator).to(accelerator.device),
    }
    parameters = sum(p.numel() for p in unet.parameters())
    print(f"U-Net: {parameters / 1e6:.2f} M parameters, batch {batch_size} of {size}px, {args.device}")
    results = {}
    sigma_rels = [0.05 * (i + 1) for i in range(args.profiles)]
    for label, options in (
        ("without post-hoc EMA", {}),
        (f"with {args.profiles} profiles", {"posthoc_ema_sigma_rels": sigma_rels}),
    ):
        import copy

        config = TrainConfig(device=args.device, **options)
        trainer = DecoderTrainer(copy.deepcopy(decoder), accelerator, config)
        results[label] = time_steps(trainer, batch, args.steps)
        print(f"training step {label}: {results[label] * 1000:.1f} ms")
        if trainer.posthoc is not None:
            unets = {1: trainer.decoder.get_unet(1)}
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(args.steps):
                    trainer.posthoc.update(unets)
                best = min(best, (time.perf_counter() - start) / args.steps)
            results["update"] = best
            print(f"update of {args.profiles} profiles alone: {best * 1000:.1f} ms")
            with tempfile.TemporaryDirectory() as folder:
                trainer.posthoc.folder = Path(folder)
                start = time.perf_counter()
                written = trainer.posthoc.write_snapshots()
                elapsed = time.perf_counter() - start
                total = sum(path.stat().st_size for path in written)
            print(f"one snapshot of {args.profiles} profiles: {elapsed * 1000:.1f} ms, {total / 1e6:.2f} MB on disk")
    base = results["without post-hoc EMA"]
    print(
        f"the profiles' updates are {100 * results['update'] / base:.1f}% of a step without them "
        "(the step timings themselves vary with the machine's load)"
    )

    per_profile = max(1, args.fit_snapshots // 2)
    every = max(1, args.fit_updates // per_profile)
    snapshots = [
        Profile(gamma_from_sigma_rel(s), 0, t) for t in range(every, args.fit_updates + 1, every) for s in (0.05, 0.1)
    ]
    start = time.perf_counter()
    fit = fit_profiles(snapshots, Profile(gamma_from_sigma_rel(0.08), 0, args.fit_updates))
    elapsed = time.perf_counter() - start
    print(
        f"fit of sigma_rel 0.08 at {args.fit_updates} updates from {len(snapshots)} snapshots: {elapsed:.2f} s, "
        f"residual L1 {fit.residual_l1:.2g}"
    )


if __name__ == "__main__":
    main()
