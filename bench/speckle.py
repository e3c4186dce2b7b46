"""Where the fast samplers' speckle comes from: one trained decoder, every sampler, the same inputs and noise.

    python bench/speckle.py --model .tracker-data/demo/latest.pth [--n_inputs 16]

For the first `--n_inputs` test images (embeddings and true images) each sampling chain below runs
from the same noise per image (one seed per image), and prints:
- rmse: RMSE to the true images (in [0, 1]; the paired error of docs/EVALUATION.md);
- hf: high-frequency energy, the RMS of the image minus its 3x3 box blur, for the samples and the
  true images. Speckle (pixel-level noise over flat areas) raises it above the true images' value.

The chains separate the candidate causes: the number of steps (DDIM with all `timesteps` steps
against 20), the deterministic ODE path against fresh noise at every step (DDIM eta 0 against eta 1,
which is DDPM's posterior noise at the same steps), and the solver (DPM-Solver++(2M), with and
without Karras spacing). docs/SAMPLING.md has what it found.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sampling import test_inputs  # noqa: E402

from dalle2_decoder.config import TrainDecoderConfig  # noqa: E402
from dalle2_decoder.loading import load  # noqa: E402


def high_frequency(images: torch.Tensor) -> float:
    """RMS of the images minus their 3x3 box blur (edges replicated): texture and pixel noise."""
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return float((images - blurred).pow(2).mean().sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=".tracker-data/demo/latest.pth")
    parser.add_argument("--n_inputs", type=int, default=16)
    parser.add_argument("--fast_steps", type=int, default=20)
    args = parser.parse_args()

    loaded = load(args.model)
    decoder = loaded.decoder
    config = TrainDecoderConfig.from_dict(loaded.config)
    embed, text, real = test_inputs(config, args.n_inputs, torch.device("cpu"))
    T, fast = decoder.num_timesteps, args.fast_steps
    print(
        f"model {loaded.source}: step {loaded.step}, {loaded.weights} weights, {T} timesteps; true images hf "
        f"{high_frequency(real):.4f}"
    )
    chains = [
        ("ddpm", T, 0.0),
        ("ddim", T, 0.0),
        ("ddim", T, 1.0),
        ("ddim", fast, 0.0),
        ("ddim", fast, 1.0),
        ("dpmpp_2m", fast, 0.0),
        ("dpmpp_2m_karras", fast, 0.0),
    ]
    for sampler, steps, eta in chains:
        decoder.ddim_sampling_eta = eta  # read by the DDIM chain only
        with torch.no_grad():
            images = decoder.sample(
                image_embed=embed,
                text_encodings=text,
                seed=list(range(embed.shape[0])),
                sampler=sampler,
                sample_timesteps=steps,
            ).clamp(0, 1)
        row = {
            "sampler": sampler,
            "steps": steps,
            "eta": eta if sampler == "ddim" else None,
            "rmse": round(float((images - real).pow(2).mean().sqrt()), 4),
            "hf": round(high_frequency(images), 4),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
