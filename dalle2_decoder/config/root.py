"""The whole run's configuration: one JSON file."""
from __future__ import annotations

import attrs

from .data import DataConfig
from .decoder import DecoderConfig
from .evaluate import EvaluateConfig
from .tracker import TrackerConfig
from .train import TrainConfig


@attrs.frozen
class TrainDecoderConfig:
    """Top level of a decoder training config."""

    decoder: DecoderConfig
    """The decoder model."""
    data: DataConfig
    """Data loading."""
    tracker: TrackerConfig
    """Logging, loading and saving."""
    train: TrainConfig = attrs.field(factory=TrainConfig)
    """Training hyperparameters."""
    evaluate: EvaluateConfig = attrs.field(factory=EvaluateConfig)
    """Evaluation metrics."""
    seed: int = 0
    """Seed for the data splits, shuffling, model initialisation and sampling."""
