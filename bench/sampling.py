"""Samplers on a trained decoder: fidelity and FID against the number of U-Net calls, and wall time per image.

    python bench/sampling.py --model .tracker-data/demo/latest.pth      # after `make demo`

For the first `--n_inputs` samples of the test split (embeddings and real images), every sampler
runs at each of `--steps`, from the same initial noise per image (one generator per image, seeded
by its index). Reported per (sampler, steps):
- calls: U-Net calls per image, counted (not assumed);
- mse_ddpm: mean squared difference (images in [0, 1]) to the full-chain DDPM sample from the same
  noise and inputs (the reference's sampler, `timesteps` calls; 1000 in a standard config, the
  demo's 100 here);
- mse_ode: the same against full-chain DDIM (deterministic, `timesteps` calls). The ODE solvers
  (DDIM, DPM-Solver++, UniPC) converge to this one, not to DDPM's stochastic path: it measures
  their discretisation error, while mse_ddpm mixes in the difference between the two processes;
- fid: FID against the real test images with the evaluation's metric code (`MetricSuite`), using
  its offline path, a TorchScript `feature` network. No pretrained Inception can be downloaded here,
  so the network is a randomly initialised convolutional feature extractor (fixed seed): values
  rank samplers within one run; they are not comparable with published FIDs;
- s_per_image: wall time per image.
Then the best sampler at 20 calls against DDIM at 20 calls, and the per-step overhead of our solver
code against diffusers' scheduler for the same solver (why the samplers are our own code).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle2_decoder.loading import load  # noqa: E402
from dalle2_decoder.models.samplers import SAMPLER_NAMES, ModelOutput, Schedule, dpmpp_2m  # noqa: E402


class RandomFeatures(nn.Module):
    """A fixed random convolutional feature extractor (floats in [0, 1] -> `dim` features)."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(64, dim, 3, stride=2, padding=1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images * 2 - 1).mean(dim=(2, 3))


def feature_file(folder: Path, dim: int) -> str:
    torch.manual_seed(0)
    path = folder / "bench_random_features.pt"
    torch.jit.script(RandomFeatures(dim).eval()).save(str(path))
    return str(path)


def held_out_loader(config):
    """The config's test split, every sample once, in the run's order (one process)."""
    from dalle2_decoder.data import create_dataloaders

    return create_dataloaders(
        config.data,
        seed=config.seed,
        validation_samples=None,
        test_samples=None,
        image_embed_dim=config.decoder.unets[0].image_embed_dim,
    )["test"]


def test_inputs(config, count: int, device):
    from dalle2_decoder.training.batches import BatchPreparer

    prepare = BatchPreparer(config, device=device).prepare
    embeds, texts, images = [], [], []
    for batch in held_out_loader(config):
        batch = prepare(batch)
        embeds.append(batch["image_embed"])
        images.append(batch["image"])
        if "text_encodings" in batch:
            texts.append(batch["text_encodings"])
        if sum(len(e) for e in embeds) >= count:
            break
    embed = torch.cat(embeds)[:count]
    text = torch.cat(texts)[:count] if texts else None
    return embed, text, torch.cat(images)[:count].float()


def run_sampler(decoder, embed, text, *, sampler, steps, cond_scale, batch_size):
    """Images (N, 3, S, S) in [0, 1], U-Net calls per image, seconds."""
    unet = decoder.unets[0]
    calls = [0]
    original = unet.forward_with_cond_scale

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    unet.forward_with_cond_scale = counting  # an instance attribute: this run only
    out = []
    started = time.perf_counter()
    try:
        for start in range(0, embed.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            out.append(
                decoder.sample(
                    image_embed=embed[rows],
                    text_encodings=None if text is None else text[rows],
                    cond_scale=cond_scale,
                    seed=list(range(start, start + embed[rows].shape[0])),
                    sampler=sampler,
                    sample_timesteps=steps,
                )
            )
    finally:
        del unet.forward_with_cond_scale
    seconds = time.perf_counter() - started
    batches = math.ceil(embed.shape[0] / batch_size)
    return torch.cat(out).float(), calls[0] // batches, seconds


def fid(suite, real, generated) -> float:
    suite.reset()
    suite.update(real, generated)
    return suite.compute(seed=0)["eval/FID"]


def solver_overhead(steps: int = 20, shape=(16, 3, 64, 64), repeats: int = 5) -> dict:
    """Seconds per step spent in solver arithmetic (a trivial denoiser): ours vs diffusers' scheduler."""
    from diffusers import DPMSolverMultistepScheduler

    from dalle2_decoder.models.schedules import make_beta_schedule

    betas = make_beta_schedule("cosine", 1000).float()
    schedule = Schedule(torch.cumprod(1 - betas, 0).double(), "eps", lambda x: x.clamp(-1, 1))
    noise = torch.randn(shape)
    denoise = lambda x, t: ModelOutput(x * 0.1)  # noqa: E731
    ours, theirs = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        dpmpp_2m(denoise, schedule, noise, steps=steps)
        ours.append((time.perf_counter() - started) / steps)
        scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=1000,
            trained_betas=betas.numpy(),
            thresholding=True,
            sample_max_value=1.0,
            timestep_spacing="trailing",
        )
        started = time.perf_counter()
        scheduler.set_timesteps(steps)
        x = noise
        for t in scheduler.timesteps:
            x = scheduler.step(x * 0.1, t, x).prev_sample
        theirs.append((time.perf_counter() - started) / steps)
    return {"ours_s_per_step": min(ours), "diffusers_s_per_step": min(theirs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=".tracker-data/demo/latest.pth")
    parser.add_argument("--n_inputs", type=int, default=8, help="test images to sample for (raise it on a GPU)")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLER_NAMES))
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--feature_dim", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--output", default=".tracker-data/bench_sampling.json", help="results as JSON (an ignored folder)"
    )
    args = parser.parse_args()

    from dalle2_decoder.config import TrainDecoderConfig
    from dalle2_decoder.evaluation import MetricSuite

    device = torch.device(args.device)
    loaded = load(args.model, device=device)
    decoder = loaded.decoder
    config = TrainDecoderConfig.from_dict(loaded.config)
    cond_scale = config.train.cond_scale
    embed, text, real = test_inputs(config, args.n_inputs, device)
    size = decoder.image_sizes[-1]
    Path(args.output).resolve().parent.mkdir(parents=True, exist_ok=True)
    suite = MetricSuite(
        {"FID": {"feature": feature_file(Path(args.output).resolve().parent, args.feature_dim), "normalize": True}},
        device=device,
        image_size=size,
    )
    T = decoder.num_timesteps
    print(
        f"model {loaded.source} (step {loaded.step}, {loaded.weights} weights), {T} timesteps, "
        f"{embed.shape[0]} test inputs, {size}px, device {device}, {torch.get_num_threads()} threads",
        flush=True,
    )

    common = dict(cond_scale=cond_scale, batch_size=args.batch_size)
    ddpm_ref, ddpm_calls, ddpm_s = run_sampler(decoder, embed, text, sampler="ddpm", steps=T, **common)
    ode_ref, _, ode_s = run_sampler(decoder, embed, text, sampler="ddim", steps=T, **common)
    rows = [
        {
            "sampler": "ddpm",
            "steps": T,
            "calls": ddpm_calls,
            "mse_ddpm": 0.0,
            "mse_ode": float(((ddpm_ref - ode_ref) ** 2).mean()),
            "fid": fid(suite, real, ddpm_ref),
            "s_per_image": ddpm_s / embed.shape[0],
        },
        {
            "sampler": "ddim",
            "steps": T,
            "calls": T,
            "mse_ddpm": float(((ode_ref - ddpm_ref) ** 2).mean()),
            "mse_ode": 0.0,
            "fid": fid(suite, real, ode_ref),
            "s_per_image": ode_s / embed.shape[0],
        },
    ]
    print(f"{'sampler':18s} {'steps':>5s} {'calls':>5s} {'mse_ddpm':>10s} {'mse_ode':>10s} {'fid':>9s} {'s/image':>8s}")

    def show(row):
        print(
            f"{row['sampler']:18s} {row['steps']:5d} {row['calls']:5d} {row['mse_ddpm']:10.5f} {row['mse_ode']:10.5f} "
            f"{row['fid']:9.4f} {row['s_per_image']:8.4f}",
            flush=True,
        )

    for row in rows:
        show(row)
    for steps in args.steps:
        for name in args.samplers:
            images, calls, seconds = run_sampler(decoder, embed, text, sampler=name, steps=steps, **common)
            row = {
                "sampler": name,
                "steps": steps,
                "calls": calls,
                "mse_ddpm": float(((images - ddpm_ref) ** 2).mean()),
                "mse_ode": float(((images - ode_ref) ** 2).mean()),
                "fid": fid(suite, real, images),
                "s_per_image": seconds / embed.shape[0],
            }
            rows.append(row)
            show(row)
            Path(args.output).write_text(json.dumps({"rows": rows}, indent=2))

    at20 = [row for row in rows if row["calls"] == 20]
    summary = {}
    if at20:
        ddim20 = next(row for row in at20 if row["sampler"] == "ddim")
        best_ode = min((row for row in at20 if row["sampler"] != "ddpm"), key=lambda row: row["mse_ode"])
        best_fid = min(at20, key=lambda row: row["fid"])
        summary = {
            "ddim_20": ddim20,
            "best_20_by_mse_ode": best_ode,
            "best_20_by_fid": best_fid,
            "mse_ode_ratio_best_vs_ddim": best_ode["mse_ode"] / max(ddim20["mse_ode"], 1e-12),
            "time_ratio_20_calls_vs_ddpm_full": ddim20["s_per_image"] / rows[0]["s_per_image"],
        }
        print(
            f"\nat 20 U-Net calls: best ODE fidelity {best_ode['sampler']} mse_ode {best_ode['mse_ode']:.5f} vs ddim "
            f"{ddim20['mse_ode']:.5f} ({summary['mse_ode_ratio_best_vs_ddim']:.2f}x); best FID {best_fid['sampler']} "
            f"{best_fid['fid']:.4f} vs ddim {ddim20['fid']:.4f}; 20 calls take "
            f"{summary['time_ratio_20_calls_vs_ddpm_full']:.3f}x the wall time of DDPM's {T}"
        )
    overhead = solver_overhead()
    print(
        f"solver arithmetic per step (DPM-Solver++ 2M, 16x3x64x64): ours {overhead['ours_s_per_step'] * 1e3:.3f} ms, "
        f"diffusers {overhead['diffusers_s_per_step'] * 1e3:.3f} ms; one U-Net call here: "
        f"{rows[1]['s_per_image'] / T * 1e3 * min(args.batch_size, embed.shape[0]):.1f} ms per batch"
    )
    Path(args.output).write_text(
        json.dumps(
            {
                "rows": rows,
                "summary": summary,
                "solver_overhead": overhead,
                "n_inputs": int(embed.shape[0]),
                "timesteps": T,
                "device": str(device),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
