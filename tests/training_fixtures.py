"""A tiny demo dataset and training configs for the training-loop tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict

EMBED_DIM = 32
IMAGE_SIZE = 16


def write_tiny_demo(root: Path) -> Dict[str, Any]:
    """96 demo images of 16px in 6 shards of 16, with per-shard embedding files; returns the `data` section."""
    from dalle2_decoder.data.demo import generate_demo_dataset

    return generate_demo_dataset(str(root), num_images=96, image_size=IMAGE_SIZE, embed_dim=EMBED_DIM, shard_size=16)


def tiny_config(data: Dict[str, Any], data_path: Path, **train) -> Dict[str, Any]:
    """A one-U-Net config that trains a few steps per epoch on the tiny demo data, on the CPU."""
    config = {
        "seed": 3,
        "decoder": {
            "unets": [
                {
                    "dim": 8,
                    "image_embed_dim": EMBED_DIM,
                    "dim_mults": [1, 2],
                    "attn_heads": 2,
                    "attn_dim_head": 8,
                    "cond_dim": 16,
                    "num_resnet_blocks": 1,
                }
            ],
            "image_sizes": [IMAGE_SIZE],
            "timesteps": 20,
            "learned_variance": False,
        },
        "data": {
            **copy.deepcopy(data),
            "num_workers": 1,
            "batch_size": 4,
            "start_shard": 0,
            "end_shard": 5,
            "splits": {"train": 0.5, "val": 0.25, "test": 0.25},
            "shuffle_train": True,
            "shuffle_buffer": 8,
        },
        "train": {
            "epochs": 2,
            "lr": 1e-3,
            "device": "cpu",
            "epoch_samples": 24,
            "validation_samples": 8,
            "save_every_n_samples": 1000,
            "n_sample_images": 2,
            **train,
        },
        "tracker": {
            "data_path": str(data_path),
            "log": {"log_type": "console", "auto_resume": True},
            "save": [
                {
                    "save_to": "local",
                    "save_latest_to": "latest.pth",
                    "save_best_to": "best.pth",
                    "save_meta_to": "meta",
                },
                {"save_to": "local", "save_latest_to": "model.safetensors", "save_type": "model"},
            ],
        },
    }
    return config
