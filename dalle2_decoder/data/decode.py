"""One sample of a shard turned into what a batch holds: the decoded, preprocessed image, its
embeddings and caption; or the reason (one of `stats.BAD_REASONS`) and a description of why it
cannot be used. Pure functions of the tar members and the `SampleFormat` every worker shares."""

from __future__ import annotations

import io
from typing import Callable, Optional

import attrs
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from . import sources

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
IMAGE_EMBED_MEMBERS = ("img_emb.npy", "image_embed.npy", "img_embed.npy", "emb.npy")
TEXT_EMBED_MEMBERS = ("text_emb.npy", "text_embed.npy")


@attrs.frozen
class SampleFormat:
    """What a sample must contain; decided once in the main process so all workers agree."""

    pil_transform: Optional[Callable]
    """Preprocessing steps before ToTensor (on the PIL image), or None."""
    tensor_transform: Optional[Callable]
    """Preprocessing steps after ToTensor (on the float image), or None."""
    index_width: int
    image_embed_source: Optional[str]
    """'folder' (per-shard .npy files), 'shard' (.npy members) or None (no image embeddings)."""
    text_embed_source: Optional[str]
    image_embed_dim: Optional[int]
    text_embed_dim: Optional[int]
    image_shape: Optional[tuple] = None
    """(height, width) every image has after the PIL steps, when the preprocessing fixes it (a Resize
    with CenterCrop, RandomResizedCrop, ...); None: images keep their own size, and the size most
    images have so far is the one expected."""
    uint8_images: bool = False
    """Batch images as uint8 (B, C, H, W) in 0..255, scaled on the consumer's device: a quarter of
    the memory to fill and to move. Only without tensor transforms (which need floats)."""


def decode_sample(sample: dict, fmt: SampleFormat):
    """(decoded sample, None, None) or (None, reason, detail) for one sample's tar members (bytes by
    extension, `__key__`; `__row_*` embedding rows, or `__bad__` and `__detail__` when reading found a fault)."""
    if "__bad__" in sample:
        return None, sample["__bad__"], sample.get("__detail__")
    decoded = {"key": sample["__key__"], "__id__": sample.get("__id__")}
    if fmt.image_embed_source:
        decoded["image_embed"], reason, detail = member_embedding(
            sample, "image_embed", fmt.image_embed_source, IMAGE_EMBED_MEMBERS, fmt.image_embed_dim
        )
        if reason:
            return None, reason, detail
    if fmt.text_embed_source:
        decoded["text_embed"], reason, detail = member_embedding(
            sample, "text_embed", fmt.text_embed_source, TEXT_EMBED_MEMBERS, fmt.text_embed_dim
        )
        if reason:
            return None, reason, detail
    extension = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if extension is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        return (
            None,
            "no_image",
            f"members {', '.join(members) or 'none'}; expected one of {', '.join(IMAGE_EXTENSIONS)}",
        )
    try:
        with Image.open(io.BytesIO(sample[extension])) as opened:
            opened.load()
            image = opened if opened.mode == "RGB" else opened.convert("RGB")
    except Exception as error:
        why = "not an image format PIL reads" if isinstance(error, UnidentifiedImageError) else str(error)
        return None, "corrupt_image", f"member .{extension} does not decode ({why})"
    if fmt.pil_transform is not None:
        steps = getattr(fmt.pil_transform, "transforms", [fmt.pil_transform])
        for step in steps:
            size = image.size if isinstance(image, Image.Image) else None
            try:
                image = step(image)
            except Exception as error:
                on = f" on a {size[0]}x{size[1]} image" if size else ""
                return None, "transform_error", f"{step!r} failed{on}: {error}"
        if not isinstance(image, Image.Image):
            return (
                None,
                "transform_error",
                (
                    f"the steps before ToTensor gave a {type(image).__name__}, not an "
                    "image (put tensor transforms after ToTensor)"
                ),
            )
    pixels = torch.from_numpy(np.array(image))  # H, W(, C) uint8, as ToTensor reads it
    decoded["image"] = pixels if pixels.ndim == 3 else pixels.unsqueeze(-1)
    decoded["caption"] = sample["txt"].decode("utf-8", errors="replace").strip() if "txt" in sample else ""
    return decoded, None, None


def member_embedding(sample: dict, name: str, source: str, members: tuple, dim: Optional[int]):
    """(vector, None, None) or (None, reason, detail)."""
    what = "image" if name == "image_embed" else "text"
    member = None
    if source == "folder":
        vector = sample.get("__row_" + name)
    else:
        member = next((m for m in members if m in sample), None)
        if member is None:
            return None, "missing_embedding", f"no {' / '.join(members)} member"
        try:
            vector = np.load(io.BytesIO(sample[member]), allow_pickle=False)
        except Exception as error:
            return None, "corrupt_embedding", f"member {sample['__key__']}.{member}: {sources.npy_problem(error)}"
    if vector is None:
        return None, "missing_embedding", f"no {what} embedding row for this sample"
    where = f"member {sample['__key__']}.{member}" if member else f"the {what} embedding row"
    vector = np.asarray(vector)
    if vector.ndim == 2 and vector.shape[0] == 1:
        vector = vector[0]  # a (1, D) array written for one sample
    if vector.ndim != 1:
        return None, "wrong_embedding_dim", f"{where} has shape {tuple(vector.shape)}, expected ({dim or 'D'},)"
    if dim is not None and vector.shape[0] != dim:
        return (
            None,
            "wrong_embedding_dim",
            (f"{where} has {vector.shape[0]} values, expected {dim} (the model's {what} embedding dimension)"),
        )
    if not np.issubdtype(vector.dtype, np.number):
        return None, "corrupt_embedding", f"{where} holds {vector.dtype} values, not numbers"
    vector = vector.astype(np.float32)
    if not np.isfinite(vector).all():
        return None, "corrupt_embedding", f"{where} holds NaN or infinite values"
    if not vector.any():
        return None, "missing_embedding", f"{where} is all zeros (clip-retrieval's mark of a missing embedding)"
    return vector, None, None
