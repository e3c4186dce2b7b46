"""`data`: where the webdataset shards and their CLIP embeddings are, and how they are loaded."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import attrs

from .checks import at_least, in_range

if TYPE_CHECKING:
    from .root import TrainDecoderConfig

END_SHARD_UNSET = 9999999
"""The reference default of `end_shard`: "up to the last shard that exists" (a range that is found)."""


@attrs.frozen
class DataSplits:
    """Fractions of the shard range given to each split; they must sum to 1."""

    train: float = 0.75
    """Fraction of shards used for training."""
    val: float = 0.15
    """Fraction of shards used for validation (validation loss, evaluation metrics)."""
    test: float = 0.1
    """Fraction of shards used for test examples in sample grids."""

    def check(self, path: str) -> List[str]:
        problems = []
        for name in ("train", "val", "test"):
            problems += in_range(f"{path}.{name}", getattr(self, name), 0.0, 1.0)
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, rel_tol=0.0, abs_tol=1e-6):
            problems.append(
                f"{path}: train + val + test must sum to 1 (got {self.train:g} + {self.val:g} + "
                f"{self.test:g} = {total:g})"
            )
        return problems


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

    def embeddings_from_shards(self) -> bool:
        """Whether embeddings come from the shards' own members: `embeddings_in_shards` when set,
        else when no `img_embeddings_url` names a folder of embedding files."""
        return self.embeddings_in_shards if self.embeddings_in_shards is not None else self.img_embeddings_url is None

    def check(self, root: "TrainDecoderConfig") -> List[str]:
        """Problems within `data`, and between it and `train` / `decoder` (where those structured)."""
        from .preprocessing import preprocessing_problems

        problems = self.splits.check("data.splits")
        if self.splits.train == 0:
            problems.append(
                "data.splits.train: 0 leaves no shard to train on; give the train split a positive fraction"
            )
        count = self.webdataset_base_url.count("{}")
        if count != 1:
            problems.append(
                f"data.webdataset_base_url: must contain {{}} exactly once, where the shard number goes "
                f"(e.g. /data/shards/{{}}.tar); got {self.webdataset_base_url!r}"
            )
        for name in ("img_embeddings_url", "text_embeddings_url"):
            folder = getattr(self, name)
            if folder is not None and not folder.strip():
                problems.append(f"data.{name}: must not be empty (leave it out instead)")
        asked = [name for name in ("train", "val", "test") if getattr(self.splits, name) > 0]
        if self.end_shard != END_SHARD_UNSET and 1 <= self.end_shard - self.start_shard + 1 < len(asked):
            shards = self.end_shard - self.start_shard + 1
            problems.append(
                f"data.end_shard: the range {self.start_shard}..{self.end_shard} holds {shards} shard"
                f"{'s' if shards != 1 else ''} but data.splits asks for {len(asked)} splits "
                f"({', '.join(asked)}), each needing a shard of its own; widen the range or set the "
                "unneeded splits to 0"
            )
        problems += at_least("data.start_shard", self.start_shard, 0)
        if self.end_shard < self.start_shard:
            problems.append(
                f"data.end_shard: must be at least data.start_shard ({self.start_shard}), got {self.end_shard}"
            )
        for name, minimum in (
            ("num_workers", 0),
            ("batch_size", 1),
            ("shard_width", 1),
            ("index_width", 1),
            ("shuffle_buffer", 1),
        ):
            problems += at_least(f"data.{name}", getattr(self, name), minimum)
        problems += in_range("data.max_bad_sample_fraction", self.max_bad_sample_fraction, 0.0, 1.0)
        if self.resample_train and self.shuffle_train:
            problems.append(
                "data.resample_train: cannot be combined with data.shuffle_train; set shuffle_train to "
                "false (resampling already draws shards at random)"
            )
        if self.resample_train and root.train is not None and root.train.epoch_samples is None:
            problems.append(
                "data.resample_train: needs train.epoch_samples, since a resampled epoch never ends by itself"
            )
        problems += preprocessing_problems(self.preprocessing)

        decoder = root.decoder
        if decoder is not None:
            clip = decoder.clip is not None
            in_shards = self.embeddings_from_shards()
            if not decoder.options.get("unconditional", False) and not (self.img_embeddings_url or in_shards or clip):
                problems.append(
                    "data.img_embeddings_url: the decoder needs image embeddings and has no source for them; "
                    "give img_embeddings_url, keep them in the shards (embeddings_in_shards), or set "
                    "decoder.clip to compute them"
                )
            text_unets = [index for index, unet in enumerate(decoder.unets) if unet.conditions_on_text]
            if text_unets and not (self.text_embeddings_url or in_shards or clip):
                problems.append(
                    f"data.text_embeddings_url: decoder.unets[{text_unets[0]}] conditions on text "
                    "(cond_on_text_encodings) but there is no source of text embeddings; give "
                    "text_embeddings_url, keep them in the shards (embeddings_in_shards), or set decoder.clip"
                )
        return problems

    def notes(self, root: "TrainDecoderConfig") -> List[str]:
        notes = []
        if self.text_embeddings_url and root.decoder is not None and not root.decoder.conditions_on_text:
            notes.append(
                "data.text_embeddings_url: no U-Net conditions on text (cond_on_text_encodings), so the text "
                "embeddings are not used"
            )
        return notes
