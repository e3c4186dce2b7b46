"""A tiny trained decoder run (checkpoint, model save, config) for the loading and sampling tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from .training_fixtures import tiny_config, write_tiny_demo


def train_tiny_run(root: Path, **decoder_options: Any) -> Dict[str, Any]:
    """Train the tiny config for one short epoch under `root`; returns paths and the raw config.

    The run writes `run/latest.pth` (a checkpoint with EMA state), `run/model.safetensors` (a model
    save of the EMA weights) and `run/meta/config.json`; `demo` holds its data (with a test split).
    """
    from dalle2_decoder.config import TrainDecoderConfig
    from dalle2_decoder.training import main

    data = write_tiny_demo(root / "demo")
    raw = tiny_config(data, root / "run", epochs=1, epoch_samples=8, validation_samples=4)
    raw["decoder"].update(decoder_options)
    (root / "config.json").write_text(json.dumps(raw))
    assert main(TrainDecoderConfig.from_dict(raw)) == 0
    return {
        "root": root,
        "config": raw,
        "config_path": root / "config.json",
        "checkpoint": root / "run" / "latest.pth",
        "model": root / "run" / "model.safetensors",
        "data": data,
    }
