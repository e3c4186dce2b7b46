"""Resizing image batches: one rule for real and generated images alike.

Bilinear and bicubic resizing filter when shrinking (antialias), so a 256px image brought down to
64px for a metric or a grid is not aliased; nearest resizing never filters (it picks pixels, as
DALLE2-pytorch's low-resolution conditioning does, which parity with it requires).
"""

from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn.functional as F

Size = Union[int, Tuple[int, int]]


def resize(images: torch.Tensor, size: Size, *, mode: str = "bilinear") -> torch.Tensor:
    """`images` (B, C, H, W) at `size` (an int for square output), as float; unchanged when already that size."""
    height, width = (size, size) if isinstance(size, int) else size
    images = images if images.is_floating_point() else images.float()
    if images.shape[-2:] == (height, width):
        return images
    if mode == "nearest":
        return F.interpolate(images, size=(height, width), mode="nearest")
    return F.interpolate(images, size=(height, width), mode=mode, antialias=True, align_corners=False)
