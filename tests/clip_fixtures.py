"""A tiny randomly initialised open_clip model, written to a `local-dir:` folder by the tests.

Nothing is downloaded: the config is small enough to build in a second, and its random weights
are saved beside it, so the adapter's real loading path (open_clip reading a local folder) runs.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_EMBED_DIM = 16
TINY_TEXT_WIDTH = 24
TINY_CONTEXT = 16
TINY_IMAGE_SIZE = 32


def write_tiny_open_clip(folder: Path, seed: int = 0, embed_dim: int = TINY_EMBED_DIM) -> str:
    """Write config + weights of a tiny CLIP (image and text embeddings of `embed_dim`) into `folder`;
    return the `local-dir:` model name."""
    import open_clip
    import torch

    model_cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": TINY_IMAGE_SIZE, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {
            "context_length": TINY_CONTEXT,
            "vocab_size": 49408,
            "width": TINY_TEXT_WIDTH,
            "heads": 2,
            "layers": 1,
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return f"local-dir:{folder}"
