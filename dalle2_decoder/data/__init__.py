"""Data pipeline: webdataset shards + CLIP embeddings -> batches for the decoder (docs/DATA.md)."""

from .loader import ShardLoader, create_dataloaders
from .plan import DataSetupError
from .stats import BAD_REASONS, BadDataError, format_counts, merge_counts
from .transforms import PreprocessingError, build_transform, validate_preprocessing

__all__ = [
    "BAD_REASONS",
    "BadDataError",
    "DataSetupError",
    "PreprocessingError",
    "ShardLoader",
    "build_transform",
    "create_dataloaders",
    "format_counts",
    "merge_counts",
    "validate_preprocessing",
]
