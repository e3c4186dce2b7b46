"""`train`: optimisation, EMA, precision, epochs and the sample/save cadence."""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Union

import attrs

from ..common.per_unet import as_list
from .checks import at_least, entries, in_range, one_of, one_per_unet

if TYPE_CHECKING:
    from .root import TrainDecoderConfig

FloatOrPerUnet = Union[float, List[float]]
IntOrPerUnet = Union[int, List[int]]
MIXED_PRECISION = ("no", "fp16", "bf16")
EMA_WARMUPS = ("power", "ratio")
"""The EMA decay warm-ups that `training.ema.ema_decay` computes. Named here, in the layer below
training, so that the EMA and this config check read one list."""
LR_SCHEDULES = ("constant", "cosine", "linear")
PER_UNET_OPTIONS = ("lr", "wd", "max_grad_norm", "cond_scale", "warmup_steps", "lr_min_ratio", "lr_decay_steps")
POSTHOC_EMA_MAX_SIGMA_REL = 0.28
"""Power-function EMA profiles exist for sigma_rel below 12 ** -0.5 (about 0.2887, exponent 0): keep below it."""


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
    """EMA decay coefficient: the most the warm-up lets the decay reach."""
    ema_update_after_step: int = 100
    """EMA: for this many optimizer steps the average copies the weights instead of averaging (as DALLE2-pytorch)."""
    ema_update_every: int = 10
    """EMA: the average is updated every this many optimizer steps (as DALLE2-pytorch)."""
    ema_warmup: str = "power"
    """EMA decay warm-up: `power` (DALLE2-pytorch's 1 - (1 + n)^(-2/3)) or `ratio` (min(beta, (1 + n) / (10 + n)))."""
    amp: bool = False
    """Accepted for DALLE2-pytorch configs and, as there, without effect: set `mixed_precision` (or accelerate's)."""
    mixed_precision: Optional[str] = None
    """Precision: `no`, `fp16` or `bf16`; None: as `accelerate launch --mixed_precision` says (default `no`)."""
    group_wd_params: bool = True
    """AdamW weight decay only on weight matrices and kernels, not on biases and norms (as DALLE2-pytorch)."""
    unet_training_mask: Optional[List[bool]] = None
    """One boolean per U-Net; false freezes that U-Net. None trains all U-Nets."""
    warmup_steps: Optional[IntOrPerUnet] = None
    """Linear learning-rate warm-up over this many optimizer steps, one value or one per U-Net; None: no warm-up."""
    lr_schedule: str = "constant"
    """After the warm-up: `constant` (DALLE2-pytorch), or `cosine` / `linear` decay to `lr * lr_min_ratio`."""
    lr_min_ratio: FloatOrPerUnet = 0.0
    """Decaying schedules: the last step's rate as a fraction of `lr`, one value or one per U-Net; in [0, 1]."""
    lr_decay_steps: Optional[IntOrPerUnet] = None
    """Decaying schedules: optimizer steps (warm-up included) to the minimum rate, one value or one per U-Net;
    None: the run's optimizer steps (epochs x batches per epoch / gradient_accumulation_steps)."""
    posthoc_ema_sigma_rels: Optional[List[float]] = None
    """Post-hoc EMA (EDM2): relative standard deviations of the power-function EMA profiles to keep; None: off."""
    posthoc_ema_every_n_steps: int = 1000
    """Post-hoc EMA: every this many EMA updates (optimizer steps applied), a snapshot of each profile is written."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    find_unused_parameters: bool = True
    """DistributedDataParallel option for multi-process runs."""
    static_graph: bool = True
    """DistributedDataParallel option for multi-process runs (DALLE2-pytorch's default)."""

    def for_unet(self, name: str, unet_number: int) -> object:
        """The value of a per-U-Net option (`lr`, `wd`, ...) for U-Net `unet_number` (from 1)."""
        value = getattr(self, name)
        return value[_list_index(unet_number)] if isinstance(value, list) else value

    def trains_unet(self, unet_number: int) -> bool:
        """Whether U-Net `unet_number` (from 1) is trained (not frozen by `unet_training_mask`)."""
        return self.unet_training_mask is None or self.unet_training_mask[_list_index(unet_number)]

    def check(self, root: "TrainDecoderConfig") -> List[str]:
        """Problems within `train`, and per-U-Net lists against the number of U-Nets in `decoder`."""
        problems: List[str] = []
        num_unets = len(root.decoder.unets) if root.decoder is not None else None
        for name in PER_UNET_OPTIONS:
            problems += one_per_unet(f"train.{name}", getattr(self, name), num_unets)
        if self.unet_training_mask is not None:
            problems += one_per_unet("train.unet_training_mask", self.unet_training_mask, num_unets)
            if not any(self.unet_training_mask):
                problems.append("train.unet_training_mask: freezes every U-Net; at least one entry must be true")
        for name, minimum in (
            ("epochs", 1),
            ("save_every_n_samples", 1),
            ("n_sample_images", 1),
            ("epoch_samples", 1),
            ("validation_samples", 0),
            ("gradient_accumulation_steps", 1),
        ):
            problems += at_least(f"train.{name}", getattr(self, name), minimum)
        for name, minimum in (
            ("lr", 0.0),
            ("wd", 0.0),
            ("max_grad_norm", 0.0),
            ("cond_scale", 0.0),
            ("warmup_steps", 0),
            ("lr_min_ratio", 0.0),
            ("lr_decay_steps", 2),
        ):
            value = getattr(self, name)
            for index, item in enumerate(as_list(value)):
                where = f"train.{name}[{index}]" if isinstance(value, list) else f"train.{name}"
                problems += at_least(where, item, minimum)
        if self.max_grad_norm is not None and 0 in as_list(self.max_grad_norm):
            problems.append("train.max_grad_norm: must be greater than 0 (null disables clipping)")
        for index, lr in enumerate(entries(self.lr, num_unets or 1)):
            frozen = (
                self.unet_training_mask is not None
                and index < len(self.unet_training_mask)
                and not self.unet_training_mask[index]
            )
            if lr == 0 and not frozen:
                where = f"train.lr[{index}]" if isinstance(self.lr, list) else "train.lr"
                problems.append(f"{where}: must be greater than 0 for a U-Net that is trained")
        problems += self._schedule_problems(num_unets)
        problems += self._posthoc_ema_problems()
        problems += in_range("train.ema_beta", self.ema_beta, 0.0, 1.0)
        problems += at_least("train.ema_update_after_step", self.ema_update_after_step, 0)
        problems += at_least("train.ema_update_every", self.ema_update_every, 1)
        problems += ema_warmup_problems("train.ema_warmup", self.ema_warmup)
        if self.mixed_precision is not None:
            problems += one_of("train.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        problems += _device_problems(self.device)
        return list(dict.fromkeys(problems))  # a single value checked for several U-Nets is reported once

    def _schedule_problems(self, num_unets: Optional[int]) -> List[str]:
        problems = one_of("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        for index, ratio in enumerate(as_list(self.lr_min_ratio)):
            where = f"train.lr_min_ratio[{index}]" if isinstance(self.lr_min_ratio, list) else "train.lr_min_ratio"
            if isinstance(ratio, (int, float)) and ratio > 1:
                problems.append(f"{where}: must be at most 1 (a fraction of train.lr), got {ratio}")
        if self.lr_schedule == "constant" or self.lr_decay_steps is None:
            return problems
        count = num_unets or 1
        for index, (decay, warmup) in enumerate(
            zip(entries(self.lr_decay_steps, count), entries(self.warmup_steps, count))
        ):
            if isinstance(decay, int) and decay < (warmup or 0) + 2:
                where = (
                    f"train.lr_decay_steps[{index}]"
                    if isinstance(self.lr_decay_steps, list)
                    else "train.lr_decay_steps"
                )
                problems.append(
                    f"{where}: {decay} leaves no decay after train.warmup_steps ({warmup or 0}); "
                    "it counts the warm-up and must exceed it by at least 2"
                )
        return problems

    def _posthoc_ema_problems(self) -> List[str]:
        problems = at_least("train.posthoc_ema_every_n_steps", self.posthoc_ema_every_n_steps, 1)
        sigma_rels = self.posthoc_ema_sigma_rels
        if sigma_rels is None:
            return problems
        if not sigma_rels:
            problems.append("train.posthoc_ema_sigma_rels: give at least one profile (e.g. [0.05, 0.1]) or null")
        for index, sigma_rel in enumerate(sigma_rels):
            if not 0 < sigma_rel <= POSTHOC_EMA_MAX_SIGMA_REL:
                problems.append(
                    f"train.posthoc_ema_sigma_rels[{index}]: must be in (0, {POSTHOC_EMA_MAX_SIGMA_REL}], "
                    f"got {sigma_rel}"
                )
        if len(set(sigma_rels)) != len(sigma_rels):
            problems.append("train.posthoc_ema_sigma_rels: each profile once (a value is repeated)")
        return problems

    def notes(self, root: "TrainDecoderConfig") -> List[str]:
        notes = []
        if self.amp:
            notes.append(
                "train.amp: has no effect (as in DALLE2-pytorch, where precision comes from accelerate); "
                "set train.mixed_precision to bf16 or fp16 for mixed precision"
            )
        return notes


def ema_warmup_problems(path: str, warmup: str) -> List[str]:
    return one_of(path, warmup, EMA_WARMUPS)


def _device_problems(device: str) -> List[str]:
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError) as error:
        return [f"train.device: not a device torch knows ({error}); e.g. cpu, cuda or cuda:0"]
    return []


def _list_index(unet_number: int) -> int:
    """The position of U-Net `unet_number` in a per-U-Net list. A number below 1 is refused: as a
    list index it would silently pick a U-Net from the end."""
    if unet_number < 1:
        raise ValueError(f"U-Nets are numbered from 1; got {unet_number}")
    return unet_number - 1
