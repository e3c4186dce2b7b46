"""A CLIP for the demo: a tiny open_clip model whose image tower is fitted to the demo's embeddings.

    python -m dalle2_decoder.data.demo_clip --out demo_data/clip [--image-size 16] [--shape-scale 1.0]

The demo's image embeddings are a fixed projection of each picture's attributes (`demo.py`), not
a CLIP's, so no released CLIP can say whether a demo sample shows what its embedding encodes. This
fits one that can: an open_clip model whose image tower is trained, on pictures drawn here from
a seed of their own (never the dataset's), to map each picture to the embedding the dataset would
store for it. Saved as an open_clip `local-dir:` folder (config and weights), it loads as any
local CLIP does, so the run's CLIP similarity (`evaluate.fidelity.clip`, docs/EVALUATION.md)
scores the demo's samples. The text tower is left random: only the image embeddings are used.

`fit.json` beside the weights records how well the fit went on pictures neither the fit nor the
dataset drew: the mean cosine between each picture's CLIP embedding and its own embedding (what a
perfect decoder's samples would score) and to the other pictures' embeddings (what a sample of
the wrong picture scores), the two ends of the scale the demo's CLIP similarity is read on.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..common.images import resize
from . import demo

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_pytorch_model.bin"
REPORT_FILE = "fit.json"


@dataclass(frozen=True)
class DemoClipSettings:
    """The demo CLIP's size and how it is fitted."""

    image_size: int = 16
    """CLIP's input side in pixels: the demo decoder's image size, so its samples are seen as made."""
    embed_dim: int = 64
    """The embedding dimension: the demo dataset's (`--embed-dim`)."""
    shape_scale: float = 1.0
    """How large the fitted pictures draw their shapes: the dataset's `--shape-scale`."""
    source_size: int = 64
    """Pictures are drawn at the dataset's image size and resized to `image_size` by CLIP's own
    preprocessing, as the dataset's images are when they are scored."""
    num_images: int = 6000
    """Pictures fitted on (each seen once per epoch)."""
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    width: int = 64
    """The image transformer's width (heads of 16 channels) and depth."""
    layers: int = 2
    noise: float = 0.05
    """Gaussian pixel noise up to this standard deviation is added to the pictures it fits on, so
    that a sample's leftover speckle does not move its embedding away from the shape it draws."""
    seed: int = 1
    """Seeds the fitted pictures (seed), the held-out pictures (seed + 1) and the weights; the
    dataset's pictures come from its own seed (0 by default), so none of them is fitted on."""
    held_out: int = 500
    """Fresh pictures the report in `fit.json` is measured on."""

    def check(self) -> None:
        if self.image_size < 4 or self.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (a 4x4 grid of patches), got {self.image_size}")
        if self.width % 16:
            raise ValueError(f"width must be a multiple of 16 (heads of 16 channels), got {self.width}")
        for name in ("num_images", "epochs", "batch_size", "layers", "held_out"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_images < self.batch_size:
            raise ValueError(f"num_images ({self.num_images}) must be at least one batch ({self.batch_size})")


def model_config(settings: DemoClipSettings) -> Dict:
    """open_clip's `model_cfg` of the demo CLIP: a 4x4-patch vision transformer, a one-layer text tower."""
    return {
        "embed_dim": settings.embed_dim,
        "vision_cfg": {
            "image_size": settings.image_size,
            "patch_size": settings.image_size // 4,
            "width": settings.width,
            "head_width": 16,
            "layers": settings.layers,
        },
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def draw_pictures(count: int, seed: int, settings: DemoClipSettings) -> Tuple[torch.Tensor, torch.Tensor]:
    """`count` random demo pictures as CLIP's (unnormalised) input, (N, 3, S, S) in [0, 1], and the
    dataset embedding of each, (N, D)."""
    rng = random.Random(seed)
    pictures, embeddings = [], []
    for _ in range(count):
        attributes = demo.random_attributes(rng, settings.shape_scale)
        picture = demo.draw_shape(*attributes, image_size=settings.source_size, shape_scale=settings.shape_scale)
        pictures.append(torch.from_numpy(np.array(picture)).permute(2, 0, 1))
        embeddings.append(torch.from_numpy(demo.image_embedding(attributes, settings.embed_dim)))
    images = torch.stack(pictures).float() / 255
    # The one resize ClipEmbedder.preprocess applies to a full-size image (bicubic, antialiased).
    images = resize(images, (settings.image_size, settings.image_size), mode="bicubic").clamp(0.0, 1.0)
    return images, torch.stack(embeddings)


def _normalise(images: torch.Tensor) -> torch.Tensor:
    import open_clip

    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def scale_ends(visual: torch.nn.Module, images: torch.Tensor, embeddings: torch.Tensor) -> Dict[str, float]:
    """The mean cosine of each picture's embedding by `visual` to its own dataset embedding
    ("own"), its lowest ("own_min"), and the mean to the other pictures' embeddings ("others")."""
    with torch.no_grad():
        seen = F.normalize(visual(_normalise(images)), dim=-1)
    cosines = seen @ embeddings.T
    own = cosines.diagonal()
    n = len(images)
    others = (cosines.sum() - own.sum()) / (n * (n - 1)) if n > 1 else torch.tensor(float("nan"))
    return {"own": float(own.mean()), "own_min": float(own.min()), "others": float(others)}


def fit_demo_clip(out_dir: str, settings: DemoClipSettings = DemoClipSettings(), *, log=print) -> Dict:
    """Fit the demo CLIP, write it to `out_dir` (an open_clip `local-dir:` folder) and return the
    report also written to its `fit.json`."""
    settings.check()
    try:
        import open_clip
    except ImportError as error:
        raise SystemExit(
            "the demo CLIP needs open_clip: `pip install dalle2-decoder[clip]` (or `pip install open_clip_torch`)"
        ) from error
    started = time.monotonic()
    torch.manual_seed(settings.seed)
    config = model_config(settings)
    model = open_clip.CLIP(**config)
    visual = model.visual
    images, embeddings = draw_pictures(settings.num_images, settings.seed, settings)
    held_images, held_embeddings = draw_pictures(settings.held_out, settings.seed + 1, settings)

    optimizer = torch.optim.AdamW(visual.parameters(), lr=settings.lr, weight_decay=0.01)
    steps_per_epoch = settings.num_images // settings.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.lr, total_steps=settings.epochs * steps_per_epoch, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(settings.seed)
    visual.train()
    for epoch in range(settings.epochs):
        order = torch.randperm(settings.num_images, generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            pictures = images[batch]
            sd = settings.noise * torch.rand(len(batch), 1, 1, 1, generator=generator)
            pictures = (pictures + sd * torch.randn(pictures.shape, generator=generator)).clamp(0.0, 1.0)
            seen = F.normalize(visual(_normalise(pictures)), dim=-1)
            loss = (1 - (seen * embeddings[batch]).sum(dim=-1)).mean()  # cosine distance to the target
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        visual.eval()
        ends = scale_ends(visual, held_images, held_embeddings)
        visual.train()
        log(
            f"demo CLIP epoch {epoch + 1}/{settings.epochs}: loss {loss.item():.4f}, held-out cosine to own "
            f"embedding {ends['own']:.4f} (to others' {ends['others']:.4f})"
        )
    model.eval()

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)
    report = {
        "held_out_cosine": ends,
        "seconds": round(time.monotonic() - started, 1),
        "settings": asdict(settings),
        "model": f"local-dir:{folder}",
    }
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2))
    # The config last: open_clip (and `make`) take the folder for a model once it is there.
    (folder / CONFIG_FILE).write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}, indent=2))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dalle2_decoder.data.demo_clip", description=__doc__.split("\n")[0])
    defaults = DemoClipSettings()
    parser.add_argument("--out", required=True, help="output folder (loads as `local-dir:<folder>`)")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="CLIP's input side (pixels)")
    parser.add_argument("--embed-dim", type=int, default=defaults.embed_dim, help="the demo data's --embed-dim")
    parser.add_argument("--shape-scale", type=float, default=defaults.shape_scale, help="the demo data's --shape-scale")
    parser.add_argument("--num-images", type=int, default=defaults.num_images, help="pictures to fit on")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    settings = DemoClipSettings(
        image_size=args.image_size,
        embed_dim=args.embed_dim,
        shape_scale=args.shape_scale,
        num_images=args.num_images,
        epochs=args.epochs,
        seed=args.seed,
    )
    try:
        report = fit_demo_clip(args.out, settings, log=lambda line: print(line, file=sys.stderr))
    except ValueError as error:
        parser.error(str(error))
    ends = report["held_out_cosine"]
    print(
        f"wrote the demo CLIP to {args.out} in {report['seconds']} s: on {settings.held_out} fresh pictures, cosine "
        f"to their own embedding {ends['own']:.4f} (lowest {ends['own_min']:.4f}), to others' {ends['others']:.4f}; "
        f'use it as {{"make": "open_clip", "model": "local-dir:{args.out}"}}'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
