"""The bundled demo dataset: coloured shapes with captions and embeddings that determine them.

    python -m dalle2_decoder.data.demo --out demo_data [--num-images 4000] [--image-size 64]
        [--embed-dim 64] [--shard-size 500] [--embeddings-in-shards] [--shape-scale 1.0]

Each image is one shape (circle, square, triangle, diamond, cross) of one of eight colours, small
or large (`--shape-scale` enlarges both), at a jittered position, on a black or white background.
The image embedding is a fixed random projection of exactly those attributes (one-hot shape and
colour, size, exact position, background), L2-normalised: it determines the picture, so a tiny
decoder can learn the mapping on a CPU. The text embedding projects the caption's attributes
(coarse position, no jitter) with another fixed matrix. Nothing here needs CLIP or a network.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import random
import sys
from typing import Dict, NamedTuple, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .writer import ShardSetWriter

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
    "cyan": (40, 200, 210),
    "grey": (128, 128, 128),
}
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "centre", "right")
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255)}
PROJECTION_SEED = 1234  # fixed: the same attributes give the same embedding in every dataset


def _features(shape: str, colour: str, size: str, x: float, y: float, background: str, exact: bool) -> np.ndarray:
    one_hot = lambda options, value: [1.0 if value == option else 0.0 for option in options]  # noqa: E731
    rgb = [c / 255.0 for c in COLOURS[colour]]
    return np.array(
        one_hot(SHAPES, shape)
        + one_hot(list(COLOURS), colour)
        + rgb
        + [1.0 if size == "large" else -1.0]
        + ([x * 2 - 1, y * 2 - 1] if exact else [0.0, 0.0])
        + one_hot(ROWS, ROWS[min(2, int(y * 3))])
        + one_hot(COLUMNS, COLUMNS[min(2, int(x * 3))])
        + [1.0 if background == "white" else -1.0],
        dtype=np.float64,
    )


@functools.lru_cache(maxsize=None)  # the same matrix every call: `image_embedding` asks once per picture
def _projection(dim: int, salt: int) -> np.ndarray:
    n_features = len(_features("circle", "red", "small", 0.5, 0.5, "black", True))
    if dim < n_features:
        raise ValueError(f"embed_dim must be at least {n_features} so the embedding determines the picture")
    return np.random.default_rng(PROJECTION_SEED + salt).standard_normal((n_features, dim)) / np.sqrt(n_features)


def _embed(features: np.ndarray, projection: np.ndarray) -> np.ndarray:
    vector = features @ projection
    return (vector / np.linalg.norm(vector)).astype(np.float32)


class Attributes(NamedTuple):
    """What one demo picture shows; x, y in [0, 1] are the shape's centre."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    background: str


def random_attributes(rng: random.Random, shape_scale: float = 1.0) -> Attributes:
    """One picture's attributes drawn from `rng`: every shape, colour, size and background equally
    likely, the centre uniform over the positions that keep the shape inside the image."""
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    size, background = rng.choice(SIZES), rng.choice(list(BACKGROUNDS))
    margin = min(0.5, (0.25 if size == "large" else 0.15) * shape_scale)
    x, y = rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)
    return Attributes(shape, colour, size, x, y, background)


def image_embedding(attributes: Attributes, embed_dim: int) -> np.ndarray:
    """The demo's image embedding of a picture with these attributes (what the dataset stores)."""
    return _embed(_features(*attributes, exact=True), _projection(embed_dim, 0))


def draw_shape(
    shape: str, colour: str, size: str, x: float, y: float, background: str, image_size: int, shape_scale: float = 1.0
) -> Image.Image:
    """The picture for one set of attributes; x, y in [0, 1] are the shape's centre; `shape_scale`
    multiplies the shape's size (the default draws it 0.44 of the side when large, 0.24 when small)."""
    scale = 2  # draw at twice the size and downsample, for smooth edges
    side = image_size * scale
    image = Image.new("RGB", (side, side), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    radius = side * (0.22 if size == "large" else 0.12) * shape_scale
    cx, cy = x * side, y * side
    fill = COLOURS[colour]
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=fill)
    else:
        arm = radius / 3
        draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=fill)
    return image.resize((image_size, image_size), Image.BILINEAR)


def generate_demo_dataset(
    out_dir: str,
    *,
    num_images: int = 4000,
    image_size: int = 64,
    embed_dim: int = 64,
    shard_size: int = 500,
    shard_width: int = 6,
    index_width: int = 4,
    embeddings_in_shards: bool = False,
    seed: int = 0,
    shape_scale: float = 1.0,
) -> dict:
    """Write the demo dataset; returns the `data` config section (as a dict) that reads it.

    `shape_scale` multiplies every shape's size (and its margin from the edges): above 1 the shapes
    keep their form at small image sizes (the CPU demo trains at 16px on shapes drawn 1.5 times as
    large), at the cost of less room to move."""
    if not 0 < shape_scale <= 2:
        raise ValueError(f"shape_scale must be in (0, 2] so that a large shape fits in the image, got {shape_scale}")
    image_projection, text_projection = _projection(embed_dim, 0), _projection(embed_dim, 1)
    rng = random.Random(seed)
    with ShardSetWriter(
        out_dir,
        shard_size=shard_size,
        shard_width=shard_width,
        index_width=index_width,
        embeddings_in_shards=embeddings_in_shards,
    ) as writer:
        for _ in range(num_images):
            shape, colour, size, x, y, background = random_attributes(rng, shape_scale)
            row, column = ROWS[min(2, int(y * 3))], COLUMNS[min(2, int(x * 3))]
            place = "in the centre" if (row, column) == ("middle", "centre") else f"at the {row} {column}"
            caption = f"a {size} {colour} {shape} {place} on a {background} background"
            buffer = io.BytesIO()
            picture = draw_shape(shape, colour, size, x, y, background, image_size, shape_scale)
            picture.save(buffer, format="JPEG", quality=92)
            writer.add(
                buffer.getvalue(),
                caption=caption,
                image_embed=_embed(_features(shape, colour, size, x, y, background, True), image_projection),
                text_embed=_embed(_features(shape, colour, size, x, y, background, False), text_projection),
            )
    data = {
        "webdataset_base_url": writer.base_url,
        "shard_width": shard_width,
        "index_width": index_width,
        "preprocessing": {"ToTensor": True},
    }
    if not embeddings_in_shards:
        data["img_embeddings_url"] = writer.embeddings_url("img_emb")
        data["text_embeddings_url"] = writer.embeddings_url("text_emb")
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dalle2_decoder.data.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-images", type=int, default=4000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--embed-dim", type=int, default=64, help="image (and text) embedding dimension")
    parser.add_argument("--shard-size", type=int, default=500, help="samples per shard")
    parser.add_argument(
        "--embeddings-in-shards",
        action="store_true",
        help="store embeddings as .npy members in the shards instead of per-shard files",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shape-scale",
        type=float,
        default=1.0,
        help="multiply every shape's size (1: 0.44 of the side when large, 0.24 when small)",
    )
    args = parser.parse_args(argv)
    data = generate_demo_dataset(
        args.out,
        num_images=args.num_images,
        image_size=args.image_size,
        embed_dim=args.embed_dim,
        shard_size=args.shard_size,
        embeddings_in_shards=args.embeddings_in_shards,
        seed=args.seed,
        shape_scale=args.shape_scale,
    )
    with open(os.path.join(args.out, "data_config.json"), "w") as file:
        json.dump({"data": data}, file, indent=2)
    print(json.dumps({"data": data}, indent=2))
    print(
        f"wrote {args.num_images} samples to {args.out}; the `data` section above is in "
        f"{os.path.join(args.out, 'data_config.json')}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
