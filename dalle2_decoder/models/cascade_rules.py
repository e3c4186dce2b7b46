"""What the Decoder's cascade settings must satisfy, each rule stated once.

The Decoder's constructor and the config check (`config.decoder`) call the same functions, so a
broken rule reads the same in both; only the option's path differs: `decoder.image_sizes` from a
config, `image_sizes` from the constructor. Each function returns `path: reason` lines (empty when
the settings are fine), see `common.problems`.
"""

from __future__ import annotations

from typing import Any, List, Sequence

from ..common.per_unet import as_list
from ..common.problems import indexed, one_of
from .samplers import SAMPLER_NAMES

LOSS_TYPES = ("l1", "l2", "huber")
"""The training losses: absolute error, squared error, and Huber's (smooth L1)."""

AUGMENTATIONS = ("use_noise_for_lowres_cond", "use_blur_for_lowres_cond")
"""The options that switch the upsamplers' low-res input augmentations on."""


def _join(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def loss_type_problems(path: str, loss_type: Any) -> List[str]:
    return one_of(path, loss_type, LOSS_TYPES)


def sampler_problems(path: str, samplers: Any) -> List[str]:
    """One sampler name or one per U-Net; None keeps the reference's choice."""
    return [
        problem
        for index, name in enumerate(as_list(samplers))
        if name is not None
        for problem in one_of(indexed(path, samplers, index), name, SAMPLER_NAMES)
    ]


def image_sizes_problems(path: str, sizes: Sequence[int], num_unets: int, unets_path: str) -> List[str]:
    """One output size per U-Net, increasing from each U-Net to the next (each upsamples its input)."""
    problems = []
    if len(sizes) != num_unets:
        problems.append(
            f"{path}: has {len(sizes)} sizes but {unets_path} has {num_unets} U-Nets; give one output size per U-Net"
        )
    if any(later <= earlier for earlier, later in zip(sizes, sizes[1:])):
        problems.append(f"{path}: sizes must increase from each U-Net to the next (got {list(sizes)})")
    return problems


def sample_steps_problems(
    path: str, steps: Any, num_unets: int, timesteps: int, timesteps_path: str = "timesteps"
) -> List[str]:
    """Sampling steps, one value or one per U-Net, each between 1 and the training timesteps (None: all)."""
    values = as_list(steps) if isinstance(steps, (list, tuple)) else [steps] * num_unets
    return [
        f"{indexed(path, steps, index)}: U-Net {index + 1} samples with {value} steps; it must be between 1 "
        f"and {timesteps_path} ({timesteps})"
        for index, value in enumerate(values)
        if value is not None and not 1 <= value <= timesteps
    ]


def augmentation_problems(section: str, use_noise: Any, use_blur: Any, num_unets: int) -> List[str]:
    """The upsamplers' noise and blur flags: one value, one per upsampler, or one per U-Net with the
    first false (U-Net 1 has no low-res input); every upsampler needs at least one of the two."""
    problems = []
    for name, value in zip(AUGMENTATIONS, (use_noise, use_blur)):
        if isinstance(value, (list, tuple)) and len(value) not in (num_unets - 1, num_unets):
            problems.append(
                f"{_join(section, name)}: has {len(value)} entries; give one value, one per upsampler "
                f"({num_unets - 1}) or one per U-Net ({num_unets})"
            )
        elif isinstance(value, (list, tuple)) and len(value) == num_unets and num_unets and value[0]:
            problems.append(f"{_join(section, name)}[0]: must be false (U-Net 1 has no low-res input)")
    if problems:
        return problems
    prefix = f"{section}: " if section else ""
    flags = zip(upsampler_flags(use_noise, num_unets), upsampler_flags(use_blur, num_unets))
    for number, (noise, blur) in enumerate(flags, 1):
        if number > 1 and not (noise or blur):
            problems.append(
                f"{prefix}U-Net {number} (an upsampler) needs noise or blur augmentation of its low-res input; "
                f"set {' or '.join(AUGMENTATIONS)}"
            )
    return problems


def upsampler_flags(value: Any, num_unets: int) -> List[bool]:
    """One flag per U-Net, false for U-Net 1, from a value that `augmentation_problems` accepts."""
    if not isinstance(value, (list, tuple)):
        return [False] + [bool(value)] * (num_unets - 1)
    flags = [bool(v) for v in value]
    return [False] + flags if len(flags) == num_unets - 1 else flags
