"""What `dalle2-sample-decoder` samples from: embeddings from a .npy file, images of a folder embedded
by CLIP, or the test split of a run's data; each loader checks its input against the decoder and
raises `SampleInputError` (exit status 2) naming the option at fault."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

from .failures import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class SampleInputError(UsageError):
    """The options or inputs cannot be used (missing, unreadable, or not fitting the decoder)."""


@dataclass
class Inputs:
    """What to sample from: one row per input."""

    ids: List[str]
    image_embed: Any  # (N, D) float tensor, CPU
    text_encodings: Any = None  # (N, L, W) or None
    text_mask: Any = None  # (N, L) bool or None
    kind: str = ""


def load_inputs(args, decoder, run_config: Dict[str, Any], device) -> Inputs:
    """The inputs the options name (--embeddings, --images or --test_split), at most --limit of them."""
    if args.embeddings:
        return embeddings_inputs(args, decoder)
    if args.images:
        return image_folder_inputs(args, decoder, run_config, device)
    return test_split_inputs(args, run_config, device)


def _load_npy(path: str, option: str):
    import numpy as np
    import torch

    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise SampleInputError(f"{option}: file not found: {path}") from None
    except (OSError, ValueError) as error:
        raise SampleInputError(f"{option}: {path} is not a readable .npy file ({error})") from None
    if not np.issubdtype(array.dtype, np.number):
        raise SampleInputError(f"{option}: {path} holds {array.dtype}, not numbers")
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


def embeddings_inputs(args, decoder) -> Inputs:
    embeds = _load_npy(args.embeddings, "--embeddings")
    if embeds.dim() == 1:
        embeds = embeds[None]
    want = decoder.unets[0].config["image_embed_dim"]
    if embeds.dim() != 2 or embeds.shape[1] != want:
        raise SampleInputError(
            f"--embeddings: {args.embeddings} has shape {tuple(embeds.shape)}; the decoder takes (N, {want})"
        )
    text = mask = None
    if args.text_encodings:
        text = _load_npy(args.text_encodings, "--text_encodings")
        if text.dim() == 2:
            text = text[:, None]  # pooled text embeddings: one context token each, as in training
        if text.dim() != 3 or text.shape[0] != embeds.shape[0]:
            raise SampleInputError(
                f"--text_encodings: {args.text_encodings} has shape {tuple(text.shape)}; "
                f"expected ({embeds.shape[0]}, L, W) to go with the {embeds.shape[0]} embeddings"
            )
        mask = text.abs().sum(-1) > 0  # zero rows are padding
    width = len(str(max(0, embeds.shape[0] - 1)))
    rows = slice(None, args.limit)
    return Inputs(
        [f"row{i:0{width}d}" for i in range(embeds.shape[0])][rows],
        embeds[rows],
        None if text is None else text[rows],
        None if mask is None else mask[rows],
        "embeddings",
    )


def _clip_config(args, run_config: Dict[str, Any]):
    from .config.decoder import ClipConfig

    recorded = (run_config.get("decoder") or {}).get("clip") or {}
    if args.config_file:
        from .config import TrainDecoderConfig

        clip = TrainDecoderConfig.from_json_path(args.config_file).decoder.clip
        recorded = (
            {}
            if clip is None
            else {"make": clip.make, "model": clip.model, "pretrained": clip.pretrained, "cache_dir": clip.cache_dir}
        )
    options = {key: value for key, value in recorded.items() if value is not None}
    for key, value in (("make", args.clip_make), ("model", args.clip_model), ("pretrained", args.clip_pretrained)):
        if value is not None:
            options[key] = value
    if "model" not in options:
        raise SampleInputError(
            "--images needs CLIP: the decoder's config has no decoder.clip; give --clip_model "
            "(and --clip_make / --clip_pretrained)"
        )
    return ClipConfig(**options)


def image_folder_inputs(args, decoder, run_config, device) -> Inputs:
    import torch
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import pil_to_tensor

    from .clip import create_clip

    folder = Path(args.images)
    if not folder.is_dir():
        raise SampleInputError(f"--images: {folder} is not a folder")
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    if args.limit is not None:
        files = files[: args.limit]
    if not files:
        raise SampleInputError(f"--images: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    clip = create_clip(_clip_config(args, run_config), device=device)
    want = decoder.unets[0].config["image_embed_dim"]
    if clip.image_embed_dim != want:
        raise SampleInputError(
            f"CLIP gives {clip.image_embed_dim}-dimensional image embeddings but the decoder takes {want}"
        )
    embeds = []
    for path in files:
        try:
            with Image.open(path) as image:
                pixels = pil_to_tensor(image.convert("RGB")).float().div(255)
        except (OSError, UnidentifiedImageError) as error:
            raise SampleInputError(f"--images: cannot read {path} ({error})") from None
        embeds.append(clip.embed_images(pixels[None].to(device)).cpu())
    return Inputs([path.stem for path in files], torch.cat(embeds), kind="images")


def run_config_for(args, run_config: Dict[str, Any]):
    """The full run config for --test_split: --config_file, else the one recorded in the save."""
    from .config import ConfigError, TrainDecoderConfig

    if args.config_file:
        return TrainDecoderConfig.from_json_path(args.config_file)
    try:
        return TrainDecoderConfig.from_dict(run_config, source=f"the config recorded in {args.model}")
    except ConfigError as error:
        raise SampleInputError(f"{str(error).splitlines()[0]} ... (pass --config_file with the run's config)") from None


def test_split_inputs(args, run_config, device) -> Inputs:
    import torch

    from .data import create_dataloaders
    from .training.batches import BatchPreparer

    config = run_config_for(args, run_config)
    # Every process reads the whole split the same way, so the inputs (and their order) do not depend on ranks.
    loader = create_dataloaders(
        config.data,
        seed=config.seed,
        rank=0,
        world_size=1,
        validation_samples=None,
        test_samples=None,
        image_embed_dim=None if config.decoder.clip else config.decoder.unets[0].image_embed_dim,
    )["test"]
    if len(loader) == 0:
        raise SampleInputError(f"the test split of {config.data.webdataset_base_url} is empty (data.splits.test)")
    prepare = BatchPreparer(config, device=device).prepare
    ids, embeds, texts, masks = [], [], [], []
    loader.set_epoch(0)
    for batch in loader:
        batch = prepare(batch)
        ids += list(batch["key"])
        embeds.append(batch["image_embed"].cpu())
        if "text_encodings" in batch:
            texts.append(batch["text_encodings"].cpu())
            masks.append(
                batch["text_mask"].cpu() if "text_mask" in batch else (batch["text_encodings"].abs().sum(-1) > 0).cpu()
            )
        if args.limit is not None and len(ids) >= args.limit:
            break
    count = len(ids) if args.limit is None else min(len(ids), args.limit)
    text = torch.cat(texts)[:count] if texts else None
    mask = torch.cat(masks)[:count] if masks else None
    return Inputs(ids[:count], torch.cat(embeds)[:count], text, mask, "test_split")
