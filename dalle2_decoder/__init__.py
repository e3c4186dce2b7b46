"""dalle2-decoder: train DALL-E 2 decoders (cascaded diffusion U-Nets on CLIP embeddings)."""

from ._version import __version__
from .config import ConfigError, TrainDecoderConfig

__all__ = ["ConfigError", "TrainDecoderConfig", "__version__", "load_decoder"]


def __getattr__(name: str):
    # `load_decoder` needs torch; imported on first use so that reading a config stays torch-free.
    if name == "load_decoder":
        from .loading import load_decoder

        return load_decoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
