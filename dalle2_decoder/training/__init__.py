"""Training: the DecoderTrainer and the epoch loop run by `train_decoder.py`."""

from .loop import TrainingRun, main
from .trainer import DecoderTrainer

__all__ = ["DecoderTrainer", "TrainingRun", "main"]
