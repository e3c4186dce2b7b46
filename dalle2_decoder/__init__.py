"""dalle2-decoder: train DALL-E 2 decoders (cascaded diffusion U-Nets on CLIP embeddings)."""
from .config import TrainDecoderConfig

__version__ = "0.1.0"

__all__ = ["TrainDecoderConfig", "__version__"]
