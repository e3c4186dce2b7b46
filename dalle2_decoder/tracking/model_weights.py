"""Saved weights into a model you built: `load_model_weights(model, path)`.

It lives with the file formats it reads; `dalle2_decoder.loading` offers it too, beside
`load_decoder`, which builds the model from the file's own config.
"""

from __future__ import annotations

import os
from typing import Union

from torch import nn

from .checkpoint import (
    CheckpointError,
    LoadedCheckpoint,
    check_release,
    checkpoint_weights,
    load_state_dict_checked,
    read_file,
)


def load_model_weights(
    model: nn.Module, path: Union[str, "os.PathLike[str]"], *, use_ema: bool = True
) -> LoadedCheckpoint:
    """Load a `model` save into `model` with strict name and shape checks; returns the `LoadedCheckpoint`.

    Accepted: this package's model saves (safetensors or weights-only `.pt`), DALLE2-pytorch model
    files (`model.pth`, names mapped) and trainer checkpoints (their EMA weights, or the trained
    ones with `use_ema=False`), and plain state dicts. Its `config_json` and `step` tell what the
    file was saved from. Raises CheckpointError naming the file when it does not load.
    """
    loaded = read_file(path)
    check_release(model, loaded)  # a file of an earlier DALLE2-pytorch release needs its release's U-Nets
    if loaded.kind != "model" and loaded.origin == "dalle2_decoder":
        raise CheckpointError(
            f"{path} is a training checkpoint, not a model save; resume from it with tracker.load, "
            "or save with save_type 'model' to get weights that load into a decoder"
        )
    weights = loaded.model_state if loaded.kind == "model" else checkpoint_weights(loaded, use_ema=use_ema)
    load_state_dict_checked(model, weights, source=str(path))
    return loaded
