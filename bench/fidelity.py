"""Cost of the decoder fidelity metric per generated image, beside what generating it costs.

    python bench/fidelity.py [--batch 32] [--sizes 64 256] [--clip ViT-B-32] [--device cpu]

For a batch of images at each size, prints the wall time per image of:
- paired: `paired_errors` (full and coarse RMSE against the true images, in float64);
- clip: `clip_similarity` through a CLIP of the named open_clip architecture (randomly initialised:
  no weights can be downloaded here; the cost is the architecture's, not the weights');
- unet_call: one forward pass of a U-Net (`dim` --unet_dim, default channel multipliers) at that
  size, for scale: generating an image takes `sample_timesteps` such calls per U-Net (1000 for DDPM
  in a reference config, tens for a fast sampler), and a reference config's U-Nets are wider.
Each figure is the median of --repeats timed runs after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle2_decoder.clip import ClipEmbedder  # noqa: E402
from dalle2_decoder.evaluation import clip_similarity, paired_errors  # noqa: E402


def timed(function, repeats: int, device: torch.device) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_clip(architecture: str, device: torch.device) -> ClipEmbedder:
    import open_clip

    model = open_clip.create_model(architecture, pretrained=None, device="cpu")
    preprocess = open_clip.get_model_preprocess_cfg(model)
    size = preprocess.get("size", 224)
    return ClipEmbedder(
        model,
        open_clip.get_tokenizer(architecture),
        image_size=size[0] if isinstance(size, (tuple, list)) else size,
        mean=preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN),
        std=preprocess.get("std", open_clip.OPENAI_DATASET_STD),
    ).to(device)


@torch.no_grad()
def measure(size: int, batch: int, clip: ClipEmbedder, unet, repeats: int, device: torch.device):
    """Seconds per image of the paired errors, CLIP similarity and one U-Net call at `size` pixels."""
    samples = torch.rand(batch, 3, size, size, device=device)
    targets = torch.rand(batch, 3, size, size, device=device)
    embeds = torch.randn(batch, clip.image_embed_dim, device=device)
    times = torch.randint(0, 1000, (batch,), device=device)
    paired = timed(lambda: paired_errors(samples, targets), repeats, device)
    similarity = timed(lambda: clip_similarity(clip, samples, embeds), repeats, device)
    call = timed(lambda: unet(samples * 2 - 1, times, image_embed=embeds), repeats, device)
    return paired / batch, similarity / batch, call / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--clip", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--unet_dim", type=int, default=64, help="U-Net width for the unet_call figure")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    clip = random_clip(args.clip, device)
    from dalle2_decoder.models.unet import Unet

    unet = Unet(dim=args.unet_dim, image_embed_dim=clip.image_embed_dim, cond_on_image_embeds=True).to(device).eval()
    print(f"device {device}, {torch.get_num_threads()} threads, batch {args.batch}, CLIP {args.clip} (random)")
    print("size  paired_s/img  clip_s/img  unet_call_s/img")
    for size in args.sizes:
        paired, similarity, call = measure(size, args.batch, clip, unet, args.repeats, device)
        print(f"{size:4d}  {paired:12.2e}  {similarity:10.2e}  {call:15.2e}")


if __name__ == "__main__":
    main()
