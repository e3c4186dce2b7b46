"""dalle2-decoder: train DALL-E 2 decoders (cascaded diffusion U-Nets on CLIP embeddings)."""

from ._version import __version__
from .config import ConfigError, TrainDecoderConfig
from .loading import load_decoder

__all__ = ["ConfigError", "TrainDecoderConfig", "__version__", "load_decoder"]
