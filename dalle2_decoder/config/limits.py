"""Checks that span sections or guard against values that would only fail deep inside a run.

Each returns `path: reason` lines, like the sections' own `check` methods, and runs on whatever
sections structured (see `TrainDecoderConfig.resolve`): numbers that are not finite, the seed's
range, U-Net options that must be positive, image sizes that the U-Nets can downsample, and a
learning rate no optimiser survives.
"""

from __future__ import annotations

import math
from typing import Any, List, Union

from ..common.per_unet import as_list
from ..models.unet_blocks import downsample_factor, image_size_problems
from .checks import show
from .structure import join_path

SEED_MAX = 2**32 - 1
"""numpy's seeding (used by the data pipeline and `accelerate.utils.set_seed`) takes 0 .. 2**32 - 1."""
MIN_IMAGE_SIZE = 8
"""Smallest U-Net output size: below it the U-Nets' convolutions and attention have nothing to work on."""
MAX_LEARNING_RATE = 1.0
"""AdamW steps of this size already destroy a network in one step; a larger `train.lr` is a typo."""
POSITIVE_UNET_OPTIONS = ("attn_heads", "attn_dim_head", "cross_attn_heads", "cross_attn_dim_head")


def non_finite_numbers(raw: Any, path: str = "") -> List[str]:
    """Every NaN or +-Infinity in the parsed JSON (Python's json reads `NaN`, `Infinity`, `1e309`)."""
    if isinstance(raw, float) and not math.isfinite(raw):
        return [f"{path or 'the configuration'}: must be a finite number (got {show(raw)})"]
    problems: List[str] = []
    if isinstance(raw, dict):
        for key, value in raw.items():
            problems += non_finite_numbers(value, join_path(path, str(key)))
    elif isinstance(raw, list):
        for index, value in enumerate(raw):
            problems += non_finite_numbers(value, join_path(path, index))
    return problems


def decoder_problems(decoder) -> List[str]:
    problems: List[str] = []
    for index, unet in enumerate(decoder.unets):
        where = f"decoder.unets[{index}]"
        for name in POSITIVE_UNET_OPTIONS:
            value = unet.options.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 1:
                problems.append(f"{where}.{name}: must be at least 1 (got {show(value)})")
        if index >= len(decoder.image_sizes) or not unet.dim_mults:
            continue
        size, where = decoder.image_sizes[index], f"decoder.image_sizes[{index}]"
        memory_efficient = bool(unet.options.get("memory_efficient", False))
        factor = downsample_factor(len(unet.dim_mults), memory_efficient)
        if size < max(MIN_IMAGE_SIZE, factor):
            problems.append(
                f"{where}: {size} is too small for U-Net {index + 1}: it must be at least "
                f"{max(MIN_IMAGE_SIZE, factor)} (its dim_mults {list(unet.dim_mults)} halve the "
                f"image {int(math.log2(factor))} times)"
            )
        else:
            problems += image_size_problems(where, size, unet.dim_mults, memory_efficient, f"U-Net {index + 1}")
    return problems


def train_problems(train) -> List[str]:
    problems: List[str] = []
    lrs: Union[float, List[float]] = train.lr
    for index, lr in enumerate(as_list(lrs)):
        where = f"train.lr[{index}]" if isinstance(lrs, list) else "train.lr"
        if isinstance(lr, (int, float)) and math.isfinite(lr) and lr > MAX_LEARNING_RATE:
            problems.append(
                f"{where}: {show(lr)} is far above any usable learning rate (at most "
                f"{MAX_LEARNING_RATE:g}; typical values are 1e-5 to 1e-3)"
            )
    return problems


def cross_section_problems(view) -> List[str]:
    """The checks of this module on the sections that structured (`view` is root's `_Sections`)."""
    problems: List[str] = []
    seed = view.seed
    if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed <= SEED_MAX:
        problems.append(f"seed: must be in 0..{SEED_MAX} (2**32 - 1), as numpy's seeding requires (got {seed})")
    if view.decoder is not None:
        problems += decoder_problems(view.decoder)
    if view.train is not None:
        problems += train_problems(view.train)
    return problems
