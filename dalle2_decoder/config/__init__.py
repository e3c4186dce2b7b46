"""Typed configuration: frozen attrs classes structured from JSON."""

from .data import DataConfig, DataSplits
from .decoder import ClipConfig, DecoderConfig, UnetConfig
from .errors import ConfigError, ConfigWarning
from .evaluate import EvaluateConfig, FidelityConfig
from .root import TrainDecoderConfig
from .tracker import (
    ConsoleLogConfig,
    HuggingfaceSaveConfig,
    LocalLoadConfig,
    LocalSaveConfig,
    TensorboardLogConfig,
    TrackerConfig,
    UnetSourceConfig,
    UnetSourcesLoadConfig,
    UrlLoadConfig,
    WandbLoadConfig,
    WandbLogConfig,
    WandbSaveConfig,
)
from .train import TrainConfig

__all__ = [
    "ClipConfig",
    "ConfigError",
    "ConfigWarning",
    "ConsoleLogConfig",
    "DataConfig",
    "DataSplits",
    "DecoderConfig",
    "EvaluateConfig",
    "FidelityConfig",
    "HuggingfaceSaveConfig",
    "LocalLoadConfig",
    "LocalSaveConfig",
    "TensorboardLogConfig",
    "TrackerConfig",
    "TrainConfig",
    "TrainDecoderConfig",
    "UnetConfig",
    "UnetSourceConfig",
    "UnetSourcesLoadConfig",
    "UrlLoadConfig",
    "WandbLoadConfig",
    "WandbLogConfig",
    "WandbSaveConfig",
]
