"""Low-resolution conditioning of the upsamplers, with the augmentations of cascaded diffusion.

Ho et al. 2021 (Cascaded Diffusion Models, sec. 4): an upsampler trained on clean low-res
images breaks on the artefacts of the stage below it; blurring and/or noising its low-res input
during training (and telling it the noise level) closes that gap.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .gaussian_diffusion import GaussianDiffusion
from .samplers import Generators, randn


def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a (B, C, H, W) batch to size x size; antialiased when shrinking."""
    if image.shape[-2:] == (size, size):
        return image
    shrinking = size < image.shape[-1] or size < image.shape[-2]
    return F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)


def gaussian_blur(image: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (B,), reflect padding."""
    b, c, h, w = image.shape
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, device=image.device, dtype=torch.float32)
    kernel = torch.exp(-(offsets[None, :] ** 2) / (2 * sigma.float()[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(image.dtype)  # (B, K)
    # One group per (sample, channel), so each sample gets its own kernel in a single conv call.
    weight = kernel.repeat_interleave(c, dim=0)  # (B*C, K)
    x = image.reshape(1, b * c, h, w)
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, weight[:, None, None, :], groups=b * c)  # horizontal
    x = F.conv2d(x, weight[:, None, :, None], groups=b * c)  # vertical
    return x.reshape(b, c, h, w)


class LowresConditioner(nn.Module):
    """Builds the low-res input of an upsampler from a batch of images in [0, 1].

    Returns the input in [-1, 1] at the upsampler's size and, when noise augmentation is on,
    the integer noise level (B,) the upsampler is told about.
    """

    def __init__(
        self,
        *,
        timesteps: int,
        downsample_first: bool = True,
        use_blur: bool = True,
        blur_prob: float = 0.5,
        blur_sigma: Union[float, Tuple[float, float]] = 0.6,
        blur_kernel_size: Union[int, Tuple[int, int]] = 3,
        use_noise: bool = False,
        noise_sample_level: float = 0.2,
    ):
        super().__init__()
        self.downsample_first = downsample_first
        self.use_blur = use_blur
        self.blur_prob = blur_prob
        self.blur_sigma = tuple(blur_sigma) if isinstance(blur_sigma, (list, tuple)) else (blur_sigma, blur_sigma)
        # A range of kernel sizes becomes its largest: sigma, drawn per sample, sets the effective width,
        # and one kernel size per batch keeps the blur a single grouped convolution.
        largest = max(blur_kernel_size) if isinstance(blur_kernel_size, (list, tuple)) else blur_kernel_size
        self.blur_kernel_size = largest if largest % 2 else largest + 1
        self.use_noise = use_noise
        self.noise_sample_level = noise_sample_level
        # A separate fixed linear schedule for the augmentation noise, independent of the U-Net's schedule.
        self.noise_schedule = GaussianDiffusion("linear", timesteps) if use_noise else None

    def forward(
        self,
        image: torch.Tensor,
        lower_size: int,
        target_size: int,
        *,
        training: bool,
        generator: Generators = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        b = image.shape[0]
        cond = resize_image(image, lower_size) if self.downsample_first else image
        if training and self.use_blur and self.blur_prob > 0:
            low, high = self.blur_sigma
            sigma = low + (high - low) * torch.rand(b, device=image.device)
            blurred = gaussian_blur(cond, sigma, self.blur_kernel_size)
            apply = (torch.rand(b, device=image.device) < self.blur_prob)[:, None, None, None]
            cond = torch.where(apply, blurred, cond)
        cond = resize_image(cond, target_size).clamp(0, 1) * 2 - 1

        if self.noise_schedule is None:
            return cond, None
        steps = self.noise_schedule.num_timesteps
        if training:
            # Train on every augmentation level so that any level can be chosen at sampling time.
            level = torch.randint(0, steps, (b,), device=image.device, generator=generator)
        else:
            level = torch.full((b,), min(int(self.noise_sample_level * steps), steps - 1), device=image.device, dtype=torch.long)
        noise = randn(cond.shape, generator, cond.device, cond.dtype)  # one generator per sample allowed
        return self.noise_schedule.q_sample(cond, level, noise), level
