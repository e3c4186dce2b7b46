"""Turn a folder of images (with optional same-named .txt captions) into webdataset shards plus
per-shard CLIP embedding files, in the layout `create_dataloaders` reads (see writer.py).

    python -m dalle2_decoder.data.prepare --images DIR --out DIR --clip-model ViT-L/14 \
        [--clip-make openai|open_clip] [--clip-weights PATH] [--shard-size 1000] [--batch-size 64]

The core, `prepare_dataset`, takes any embedder object with
    embed_images(images: Tensor (B, 3, S, S) floats in [0, 1]) -> (B, D)
    embed_texts(captions: list[str]) -> (B, D)            (optional)
    image_size: int                                        (optional, default 224: S above)
The command line builds one from the CLIP adapter (`dalle2_decoder.clip`, local weights).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from typing import List, Optional, Tuple

import torch
from PIL import Image
from torchvision import transforms as T

from ..common.files import unwritable_folder_reason
from ..config.decoder import CLIP_MAKES
from .writer import ShardSetWriter

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def find_images(folder: str) -> List[Tuple[str, Optional[str]]]:
    """(image path, caption or None) for every image under `folder`, in sorted path order."""
    found = []
    for directory, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in IMAGE_SUFFIXES:
                continue
            caption_path = os.path.join(directory, stem + ".txt")
            caption = None
            if os.path.exists(caption_path):
                with open(caption_path, encoding="utf-8", errors="replace") as file:
                    caption = file.read().strip()
            found.append((os.path.join(directory, name), caption))
    return found


def _stored_bytes(path: str, image: Image.Image, max_image_size: Optional[int]) -> Tuple[bytes, str]:
    """The bytes to put in the shard: the file as it is, or a downscaled JPEG when it is too large."""
    if max_image_size is None or max(image.size) <= max_image_size:
        with open(path, "rb") as file:
            extension = os.path.splitext(path)[1].lower().lstrip(".")
            return file.read(), "jpg" if extension == "jpeg" else extension
    smaller = image.copy()
    smaller.thumbnail((max_image_size, max_image_size), Image.BICUBIC)
    buffer = io.BytesIO()
    smaller.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue(), "jpg"


def prepare_dataset(
    image_folder: str,
    out_dir: str,
    embedder,
    *,
    shard_size: int = 1000,
    shard_width: int = 6,
    index_width: int = 4,
    batch_size: int = 64,
    max_image_size: Optional[int] = None,
    embeddings_in_shards: bool = False,
) -> dict:
    """Write shards and embeddings for every readable image under `image_folder`.

    Returns the `data` config section (a dict) that reads the result. Images that do not decode
    are left out with a warning. Samples without a caption get an empty caption and, when the
    embedder embeds texts, an all-zero text embedding row (the loader's "missing").
    """
    items = find_images(image_folder)
    if not items:
        raise FileNotFoundError(f"no image ({', '.join(IMAGE_SUFFIXES)}) under {image_folder!r}")
    side = int(getattr(embedder, "image_size", 224))
    to_model_input = T.Compose([T.Resize(side), T.CenterCrop(side), T.ToTensor()])
    embeds_texts = callable(getattr(embedder, "embed_texts", None))
    skipped = 0
    with ShardSetWriter(
        out_dir,
        shard_size=shard_size,
        shard_width=shard_width,
        index_width=index_width,
        embeddings_in_shards=embeddings_in_shards,
    ) as writer:
        for start in range(0, len(items), batch_size):
            batch = []
            for path, caption in items[start : start + batch_size]:
                try:
                    with Image.open(path) as opened:
                        image = opened.convert("RGB")
                except Exception as error:
                    log.warning("skipping %s: not a readable image (%s)", path, error)
                    skipped += 1
                    continue
                batch.append((path, caption, image))
            if not batch:
                continue
            with torch.no_grad():
                pixels = torch.stack([to_model_input(image) for _, _, image in batch])
                image_embeds = torch.as_tensor(embedder.embed_images(pixels)).float().cpu().numpy()
                text_embeds = None
                if embeds_texts:
                    captions = [caption or "" for _, caption, _ in batch]
                    text_embeds = torch.as_tensor(embedder.embed_texts(captions)).float().cpu().numpy().copy()
                    for row, (_, caption, _) in enumerate(batch):
                        if not caption:
                            text_embeds[row] = 0.0
            for row, (path, caption, image) in enumerate(batch):
                data, extension = _stored_bytes(path, image, max_image_size)
                writer.add(
                    data,
                    caption=caption or "",
                    image_ext=extension,
                    image_embed=image_embeds[row],
                    text_embed=None if text_embeds is None else text_embeds[row],
                )
    log.info(
        "wrote %d samples in %d shard(s) to %s (%d unreadable image(s) left out)",
        len(items) - skipped,
        len(writer.sizes),
        out_dir,
        skipped,
    )
    data = {"webdataset_base_url": writer.base_url, "shard_width": shard_width, "index_width": index_width}
    if not embeddings_in_shards:
        data["img_embeddings_url"] = writer.embeddings_url("img_emb")
        if embeds_texts:
            data["text_embeddings_url"] = writer.embeddings_url("text_emb")
    return data


class ClipDataEmbedder:
    """The CLIP adapter seen as this command's embedder: pooled text embeddings, one row per caption."""

    def __init__(self, clip):
        self.clip = clip
        self.image_size = clip.image_size

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.embed_images(images)

    def embed_texts(self, captions: List[str]) -> torch.Tensor:
        return self.clip.embed_texts(captions).text_embed


def load_clip_embedder(
    make: str, model: str, weights: Optional[str], cache_dir: Optional[str] = None
) -> ClipDataEmbedder:
    """CLIP through the adapter (`dalle2_decoder.clip`), with weights from a local file or cache."""
    from ..clip import create_clip
    from ..config import ClipConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return ClipDataEmbedder(
        create_clip(ClipConfig(make=make, model=model, pretrained=weights, cache_dir=cache_dir), device)
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dalle2_decoder.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--images", required=True, help="folder of images (and optional same-named .txt captions)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--clip-make", default="openai", choices=list(CLIP_MAKES), help="CLIP implementation")
    parser.add_argument(
        "--clip-model", default="ViT-L/14", help="CLIP model name (or an open_clip `local-dir:` folder)"
    )
    parser.add_argument("--clip-weights", default=None, help="local weights file (or open_clip pretrained tag)")
    parser.add_argument("--clip-cache-dir", default=None, help="folder holding downloaded CLIP weights")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--shard-width", type=int, default=6)
    parser.add_argument("--index-width", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-image-size", type=int, default=None, help="downscale larger images (stored as JPEG)")
    parser.add_argument("--embeddings-in-shards", action="store_true")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of errors too")
    args = parser.parse_args(argv)
    from ..failures import guarded

    return guarded(lambda: _main(args), debug=args.debug, write_paths=lambda: [os.path.abspath(args.out)])


def _has_an_image(folder: str) -> bool:
    """Whether any image is under `folder` (stops at the first: the full listing comes later)."""
    return any(os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES for _, _, names in os.walk(folder) for name in names)


def argument_problems(args: argparse.Namespace) -> List[str]:
    """Every problem of the arguments, found before CLIP (slow, large) is loaded."""
    problems = []
    if not os.path.exists(args.images):
        problems.append(f"--images: folder not found: {args.images}")
    elif not os.path.isdir(args.images):
        problems.append(f"--images: {args.images} is a file; give the folder that holds the images")
    elif not _has_an_image(args.images):
        problems.append(f"--images: no image ({', '.join(IMAGE_SUFFIXES)}) under {args.images}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        problems.append(f"--out: {args.out} is a file, not a folder")
    else:
        reason = unwritable_folder_reason(args.out)
        if reason:
            problems.append(f"--out: {reason}")
    for name in ("shard_size", "shard_width", "index_width", "batch_size"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')}: must be at least 1 (got {getattr(args, name)})")
    if args.shard_size >= 1 and args.index_width >= 1 and args.shard_size > 10**args.index_width:
        problems.append(
            f"--shard-size: {args.shard_size} samples do not fit --index-width {args.index_width} "
            f"(at most {10**args.index_width})"
        )
    if args.max_image_size is not None and args.max_image_size < 1:
        problems.append(f"--max-image-size: must be at least 1 (got {args.max_image_size})")
    weights = args.clip_weights
    if (
        weights
        and (os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors")))
        and not os.path.isfile(weights)
    ):
        problems.append(f"--clip-weights: file not found: {weights}")
    return problems


def _main(args: argparse.Namespace) -> int:
    from ..failures import UsageError

    problems = argument_problems(args)
    if problems:
        raise UsageError("\n".join(problems))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    embedder = load_clip_embedder(args.clip_make, args.clip_model, args.clip_weights, args.clip_cache_dir)
    data = prepare_dataset(
        args.images,
        args.out,
        embedder,
        shard_size=args.shard_size,
        shard_width=args.shard_width,
        index_width=args.index_width,
        batch_size=args.batch_size,
        max_image_size=args.max_image_size,
        embeddings_in_shards=args.embeddings_in_shards,
    )
    print(json.dumps({"data": data}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
