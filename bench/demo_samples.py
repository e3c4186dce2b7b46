"""Look at a trained demo decoder under several samplers and guidance scales, image by image.

    python bench/demo_samples.py --model .tracker-data/demo/latest.pth [--config example_configs/demo_cpu.json]
        [--n 16] [--out .tracker-data/demo_samples] [SAMPLER:STEPS:SCALE ...]

For the first `--n` test images of the config's data, each setting (default `dpmpp_2m:10:1`; `ddpm`
ignores STEPS) samples the EMA weights from the same noise per image (seed 1000 + i), prints the
mean paired errors and, with the config's CLIP (`evaluate.fidelity.clip`: the demo's, which `make
demo-data` fits), the mean CLIP similarity of the samples and of the true images themselves (the
most a sample can score) (docs/EVALUATION.md), and writes `OUT_SAMPLER_STEPS_SCALE.png`: each true image
beside its sample, captioned with the test caption and the sample's paired RMSE, so that the shapes
can be counted one by one (docs/RECIPE.md's demo tables).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sampling import held_out_loader  # noqa: E402

NOISE_SEED = 1000


def first_test_examples(config, count: int, device):
    """(prepared batch, captions) of the first `count` test images, as the run's loaders read them."""
    from dalle2_decoder.training.batches import BatchPreparer

    batches, captions = [], []
    for batch in held_out_loader(config):
        batches.append(batch)
        captions += list(batch.get("caption", [""] * len(batch["image"])))
        if len(captions) >= count:
            break
    joined = {key: torch.cat([b[key] for b in batches])[:count] for key in ("image", "image_embed")}
    return BatchPreparer(config, device=device).prepare(joined), captions[:count]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("settings", nargs="*", default=["dpmpp_2m:10:1"], help="SAMPLER:STEPS:GUIDANCE_SCALE")
    parser.add_argument("--model", required=True, help="a checkpoint or model save of the demo's decoder")
    parser.add_argument("--config", default="example_configs/demo_cpu.json")
    parser.add_argument("--n", type=int, default=16, help="test images")
    parser.add_argument("--out", default=".tracker-data/demo_samples", help="prefix of the grid files")
    args = parser.parse_args(argv)

    from PIL import Image

    from dalle2_decoder.cli import load_config
    from dalle2_decoder.evaluate import load_decoder
    from dalle2_decoder.evaluation import clip_similarity, fidelity_clip, paired_errors
    from dalle2_decoder.tracking.grids import captioned_grid

    config, _ = load_config(args.config)
    device = torch.device("cpu")
    batch, captions = first_test_examples(config, args.n, device)
    decoder, step = load_decoder(config, args.model, use_ema=True)
    decoder.eval()
    size = config.decoder.image_sizes[-1]
    real = batch["image"].float()
    if real.shape[-1] != size:
        real = F.interpolate(real, size=(size, size), mode="area")
    real = real.clamp(0, 1)
    print(f"{args.model}: {len(captions)} test images, samples seen {step}")
    clip = fidelity_clip(config, device)
    clip_text = lambda images: (  # noqa: E731
        f"  clip {clip_similarity(clip, images, batch['image_embed']).mean():.4f}" if clip is not None else ""
    )
    print(f"{'true images':>18}{clip_text(real)}")
    for setting in args.settings:
        sampler, steps, scale = setting.split(":")
        with torch.no_grad():
            generated = decoder.sample(
                image_embed=batch["image_embed"],
                cond_scale=float(scale),
                seed=[NOISE_SEED + i for i in range(len(captions))],
                sampler=sampler,
                sample_timesteps=None if sampler == "ddpm" else int(steps),
            )
        generated = generated.float().clamp(0, 1)
        errors = paired_errors(generated, real, coarse_size=8)
        paired, coarse = errors["paired_rmse"].mean(), errors["paired_rmse_coarse"].mean()
        print(f"{setting:>18}  paired {paired:.4f}  coarse {coarse:.4f}{clip_text(generated)}")
        to_uint8 = lambda image: (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # noqa: E731
        cells, texts = [], []
        for i, caption in enumerate(captions):
            cells += [to_uint8(real[i]), to_uint8(generated[i])]
            texts += [f"{i} real: {caption}", f"{i} sample, RMSE {errors['paired_rmse'][i]:.3f}"]
        path = f"{args.out}_{setting.replace(':', '_')}.png"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(captioned_grid(cells, texts, columns=8)).save(path)
        print(f"{'':>18}  grid: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
