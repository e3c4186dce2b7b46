"""`train`: optimisation, EMA, precision, epochs and the sample/save cadence."""
from __future__ import annotations

from typing import List, Optional, Union

import attrs

FloatOrPerUnet = Union[float, List[float]]


@attrs.frozen
class TrainConfig:
    """Training hyperparameters. List-valued options give one value per U-Net."""

    epochs: int = 20
    """Number of epochs in the run."""
    lr: FloatOrPerUnet = 1e-4
    """AdamW learning rate, one value or one per U-Net."""
    wd: FloatOrPerUnet = 0.01
    """AdamW weight decay, one value or one per U-Net."""
    max_grad_norm: Optional[FloatOrPerUnet] = 0.5
    """Gradient norm clipping, one value or one per U-Net; None disables clipping."""
    save_every_n_samples: int = 100000
    """Every this many training samples, write sample grids and save a checkpoint."""
    n_sample_images: int = 6
    """Images in each sample grid (from train and from test examples)."""
    cond_scale: FloatOrPerUnet = 1.0
    """Classifier-free guidance scale for sampling, one value or one per U-Net."""
    device: str = "cuda:0"
    """Device for single-process runs; `accelerate launch` decides the device in launched runs."""
    epoch_samples: Optional[int] = None
    """Limit of training samples per epoch; None means the whole train split. Required with resampling."""
    validation_samples: Optional[int] = None
    """Samples used for validation; None means the whole validation split."""
    save_immediately: bool = False
    """Save a checkpoint and sample grids before the first training step."""
    use_ema: bool = True
    """Keep an exponential moving average of each trained U-Net for sampling and `model` saves."""
    ema_beta: float = 0.99
    """EMA decay coefficient."""
    amp: bool = False
    """Mixed precision (reference option): bf16 where supported, else fp16 with loss scaling."""
    mixed_precision: Optional[str] = None
    """Explicit precision: `no`, `fp16` or `bf16`; overrides `amp` when set."""
    unet_training_mask: Optional[List[bool]] = None
    """One boolean per U-Net; false freezes that U-Net. None trains all U-Nets."""
    warmup_steps: Optional[int] = None
    """Linear learning-rate warm-up over this many optimizer steps."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    find_unused_parameters: bool = True
    """DistributedDataParallel option for multi-process runs."""
    static_graph: bool = False
    """DistributedDataParallel option for multi-process runs."""
