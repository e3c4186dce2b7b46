"""dalle2-decoder: train DALL-E 2 decoders (cascaded diffusion U-Nets on CLIP embeddings)."""
from .config import ConfigError, TrainDecoderConfig

__version__ = "0.1.0"

__all__ = ["ConfigError", "TrainDecoderConfig", "__version__"]
