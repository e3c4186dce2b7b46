"""`data`: where the webdataset shards and their CLIP embeddings are, and how they are loaded."""
from __future__ import annotations

from typing import Any, Dict, Optional

import attrs


@attrs.frozen
class DataSplits:
    """Fractions of the shard range given to each split; they must sum to 1."""

    train: float = 0.75
    """Fraction of shards used for training."""
    val: float = 0.15
    """Fraction of shards used for validation (validation loss, evaluation metrics)."""
    test: float = 0.1
    """Fraction of shards used for test examples in sample grids."""


@attrs.frozen
class DataConfig:
    """Settings for creating the train, val and test dataloaders."""

    webdataset_base_url: str
    """URL of one shard with the shard number replaced by `{}` (local path, http(s), `pipe:` command, s3://)."""
    img_embeddings_url: Optional[str] = None
    """Folder (any fsspec URL) of per-shard image embedding files named `*_<shard>.npy`."""
    text_embeddings_url: Optional[str] = None
    """Folder (any fsspec URL) of per-shard text embedding files named `*_<shard>.npy`."""
    num_workers: int = 4
    """Dataloader worker processes per rank."""
    batch_size: int = 64
    """Samples per batch on each rank."""
    start_shard: int = 0
    """First shard number of the range (inclusive)."""
    end_shard: int = 9999999
    """Last shard number of the range (inclusive)."""
    shard_width: int = 6
    """Digits of the zero-padded shard number in shard file names."""
    index_width: int = 4
    """Digits at the end of a sample key that give its index inside its shard."""
    splits: DataSplits = attrs.field(factory=DataSplits)
    """Proportions of shards for train, val and test; split deterministically by `seed`."""
    shuffle_train: bool = True
    """Shuffle the training shard order each epoch and samples through a shuffle buffer."""
    resample_train: bool = False
    """Sample training shards with replacement; needs `train.epoch_samples`; excludes `shuffle_train`."""
    preprocessing: Dict[str, Any] = attrs.field(factory=lambda: {"ToTensor": True})
    """torchvision transforms by name, in order; the value is True or the transform's arguments."""
    embeddings_in_shards: Optional[bool] = None
    """Read embeddings from `.npy` members inside the shards. None: yes when no `img_embeddings_url` is given."""
    shuffle_buffer: int = 1000
    """Samples held in the training shuffle buffer (with `shuffle_train`)."""
    max_bad_sample_fraction: float = 0.01
    """Stop with an error when more than this fraction of the samples seen in a phase is bad."""
    skip_missing_shards: bool = False
    """Leave out local shard files that do not exist (listed in a warning) instead of failing at start."""
