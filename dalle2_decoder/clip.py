"""CLIP on the fly: image embeddings and per-token text encodings for data that has none.

`create_clip(config.decoder.clip)` returns a frozen `ClipEmbedder`. It is kept apart from the
Decoder on purpose: CLIP never enters the decoder's checkpoints, optimizers or EMA, and it is only
built when the data lacks precomputed embeddings.

Both makes go through open_clip (an optional extra, `pip install dalle2-decoder[clip]`):
`openai` serves OpenAI's released weights (the original `.pt` files load too), `open_clip` any
open_clip model. Weights come from a local file (`pretrained`), a `local-dir:` folder holding
`open_clip_config.json` and the weights, or open_clip's cache (`cache_dir`); where nothing can be
downloaded the error names the file to provide.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, ClassVar, Iterator, List, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common.images import resize
from .failures import EXIT_IO

if TYPE_CHECKING:
    from .config.decoder import ClipConfig

INSTALL_HINT = (
    "open_clip is not installed: install it with `pip install dalle2-decoder[clip]` (or `pip install open_clip_torch`)"
)

# OpenAI's release names use '/' and '@336px'; open_clip's registry spells them with '-'.
_OPENAI_FILE_NAMES = {
    "ViT-L/14": "ViT-L-14.pt",
    "ViT-B/32": "ViT-B-32.pt",
    "ViT-B/16": "ViT-B-16.pt",
    "ViT-L/14@336px": "ViT-L-14-336px.pt",
}


class ClipLoadError(RuntimeError):
    """CLIP could not be built: the message says what to install or which file to provide."""

    exit_status: ClassVar[int] = EXIT_IO


class TextEncoding(NamedTuple):
    """CLIP's view of a batch of captions."""

    text_embed: torch.Tensor
    """(B, D) normalised pooled text embeddings, in the joint image-text space."""
    text_encodings: torch.Tensor
    """(B, N, W) per-token outputs of the text transformer: the U-Nets' text context tokens."""
    text_mask: torch.Tensor
    """(B, N) booleans, true for real tokens (start, words, end), false for padding."""


def open_clip_name(make: str, model: str) -> str:
    """open_clip's registry name for a model as the config spells it."""
    if make == "openai":
        return model.replace("@336px", "-336").replace("/", "-")
    return model


class ClipEmbedder(nn.Module):
    """A frozen CLIP model with the two calls the decoder needs, working on tensor batches."""

    def __init__(self, model: nn.Module, tokenizer, *, image_size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        # open_clip's CLIP keeps the text tower's modules on the model itself; CustomTextCLIP under `.text`.
        self._text_tower = getattr(model, "text", model)
        if not hasattr(self._text_tower, "ln_final"):
            raise ClipLoadError(
                "this CLIP's text tower has no per-token output (ln_final); use a CLIP with a transformer text tower"
            )
        self.train(False)

    def train(self, mode: bool = True) -> "ClipEmbedder":
        # CLIP stays in eval mode whatever the surrounding code asks: it is never trained here.
        return super().train(False)

    @property
    def image_embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def text_embed_dim(self) -> int:
        return int(self._text_tower.ln_final.normalized_shape[0])

    @property
    def max_text_len(self) -> int:
        return int(getattr(self._text_tower, "context_length", getattr(self.model, "context_length", 77)))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] of any size -> CLIP's input: shorter side resized, centre-cropped, normalised."""
        height, width = images.shape[-2:]
        scale = self.image_size / min(height, width)
        new_size = (max(self.image_size, round(height * scale)), max(self.image_size, round(width * scale)))
        images = resize(images, new_size, mode="bicubic")  # as CLIP's own preprocessing: bicubic, antialiased
        top = (images.shape[-2] - self.image_size) // 2
        left = (images.shape[-1] - self.image_size) // 2
        images = images[..., top : top + self.image_size, left : left + self.image_size].clamp(0.0, 1.0)
        return (images - self.mean) / self.std

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) L2-normalised float32 image embeddings."""
        pixels = self.preprocess(images.to(self.mean.device))
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, captions: List[str]) -> TextEncoding:
        """Captions -> pooled embeddings, per-token encodings and the padding mask."""
        tokens = self.tokenizer(list(captions)).to(self.mean.device)
        captured = {}
        # The per-token states are the text transformer's final layer norm output, before pooling;
        # a hook reads them off the model's own encode_text rather than re-implementing the tower.
        handle = self._text_tower.ln_final.register_forward_hook(
            lambda _m, _i, out: captured.__setitem__("tokens", out)
        )
        try:
            text_embed = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        finally:
            handle.remove()
        encodings = captured["tokens"].float()
        if encodings.shape[1] != tokens.shape[1]:
            raise ClipLoadError(
                "this CLIP pools before its final layer norm; per-token text encodings are not available"
            )
        mask = tokens != 0  # open_clip's tokenizers pad with 0
        return TextEncoding(text_embed, encodings * mask.unsqueeze(-1), mask)


def _open_clip_chatter(record: logging.LogRecord) -> bool:
    """False for open_clip's own progress notes: below WARNING, logged on the root logger by its code."""
    return not (
        record.name == "root" and record.levelno < logging.WARNING and f"{os.sep}open_clip{os.sep}" in record.pathname
    )


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip reports every loading step (about a dozen lines) with `logging.info` on the root
    logger, which a run's log shows; its warnings and errors still pass. A filter on the root logger
    sees only records logged on it directly, so the package's and other libraries' lines are untouched."""
    root = logging.getLogger()
    root.addFilter(_open_clip_chatter)
    try:
        yield
    finally:
        root.removeFilter(_open_clip_chatter)


def _import_open_clip():
    try:
        import open_clip
    except ImportError as error:
        raise ClipLoadError(INSTALL_HINT) from error
    return open_clip


def create_clip(
    config: "ClipConfig", device: torch.device | str = "cpu", *, where: str = "decoder.clip"
) -> ClipEmbedder:
    """Build the frozen CLIP named by `config` (the option at `where`), with weights from a local file or cache."""
    open_clip = _import_open_clip()
    name = open_clip_name(config.make, config.model)
    if config.make not in ("openai", "open_clip"):
        raise ClipLoadError(f"{where}.make: unknown CLIP make {config.make!r} (use 'openai' or 'open_clip')")
    if config.pretrained is not None and not name.startswith(("local-dir:", "hf-hub:")):
        looks_like_path = os.sep in config.pretrained or config.pretrained.endswith(
            (".pt", ".pth", ".bin", ".safetensors")
        )
        if looks_like_path and not os.path.isfile(config.pretrained):
            raise ClipLoadError(f"{where}.pretrained: weights file {config.pretrained!r} does not exist")

    with _quiet_open_clip():
        model = _load_open_clip_model(open_clip, config, name, where)
        tokenizer = open_clip.get_tokenizer(name)
        preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    size = preprocess_cfg.get("size", getattr(model.visual, "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else size
    embedder = ClipEmbedder(
        model,
        tokenizer,
        image_size=size,
        mean=preprocess_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN),
        std=preprocess_cfg.get("std", open_clip.OPENAI_DATASET_STD),
    )
    return embedder.to(device)


def _load_open_clip_model(open_clip, config: "ClipConfig", name: str, where: str) -> nn.Module:
    """The open_clip model with its weights, from OpenAI's file, a local folder or file, or the cache."""
    try:
        if config.make == "openai" and config.pretrained and os.path.isfile(config.pretrained):
            # OpenAI's own release files are TorchScript archives; open_clip converts them.
            model = open_clip.load_openai_model(
                config.pretrained, precision="fp32", device="cpu", cache_dir=config.cache_dir
            )
        else:
            pretrained = (
                config.pretrained if config.pretrained is not None else ("openai" if config.make == "openai" else None)
            )
            if pretrained is None and not name.startswith(("local-dir:", "hf-hub:")):
                raise ClipLoadError(
                    f"{where}.pretrained: open_clip model {name!r} needs weights: a pretrained tag, a local file, "
                    "or a `local-dir:` model folder (a randomly initialised CLIP would give meaningless embeddings)"
                )
            model = open_clip.create_model(
                name, pretrained=pretrained, cache_dir=config.cache_dir, device="cpu", require_pretrained=True
            )
    except ClipLoadError:
        raise
    except Exception as error:  # download failures surface as many types; all mean "provide the file"
        wanted = _OPENAI_FILE_NAMES.get(config.model, f"the weights of {name}")
        raise ClipLoadError(
            f"could not load CLIP {config.make}:{config.model} ({error}). Without network access, download "
            f"{wanted} elsewhere and set {where}.pretrained to its path (or {where}.cache_dir to a folder "
            "holding open_clip's cache)"
        ) from error
    return model
