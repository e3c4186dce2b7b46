"""Low-resolution conditioning of the upsamplers, with the augmentations of cascaded diffusion.

Ho et al. 2021 (Cascaded Diffusion Models, sec. 4): an upsampler trained on clean low-res
images breaks on the artefacts of the stage below it; blurring and/or noising its low-res input
during training (and telling it the noise level) closes that gap.

Everything here follows DALLE2-pytorch 1.15.6's `LowresConditioner`: nearest-neighbour resizing,
one blur decision (and sigma, kernel size) per batch, and Imagen-style noise augmentation on a
fixed 1000-step linear schedule whatever the decoder's own number of timesteps.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..common.images import resize
from .gaussian_diffusion import GaussianDiffusion

LOWRES_NOISE_TIMESTEPS = 1000
"""Steps of the augmentation-noise schedule (fixed, as in the reference)."""


def resize_image(image: torch.Tensor, size: int, clamp_range: Optional[Tuple[float, float]] = None) -> torch.Tensor:
    """Nearest-neighbour resize of a (B, C, H, W) batch to size x size, then clamped to clamp_range.

    A batch already `size` wide is returned untouched (not even clamped), as the reference does.
    """
    if image.shape[-1] == size:
        return image
    out = resize(image, size, mode="nearest")
    return out if clamp_range is None else out.clamp(*clamp_range)


def gaussian_blur(image: torch.Tensor, sigma: float, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur of a (B, C, H, W) batch with reflect padding (odd kernel_size)."""
    b, c, h, w = image.shape
    radius = kernel_size // 2
    offsets = torch.arange(kernel_size, device=image.device, dtype=torch.float32) - radius
    kernel = torch.exp(-(offsets**2) / (2 * float(sigma) ** 2))
    kernel = (kernel / kernel.sum()).to(image.dtype)
    x = image.reshape(b * c, 1, h, w)
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.reshape(1, 1, 1, -1))  # along the width
    x = F.conv2d(x, kernel.reshape(1, 1, -1, 1))  # along the height
    return x.reshape(b, c, h, w)


class LowresConditioner(nn.Module):
    """Builds one upsampler's low-res input from a batch of images.

    Images come in the decoder's input range (`input_range`: [0, 1], or [-1, 1] when the decoder
    does not normalise); the result is in the same range (the decoder normalises it afterwards),
    with the integer augmentation noise level (B,) when noise augmentation is on.
    """

    def __init__(
        self,
        *,
        downsample_first: bool = True,
        use_blur: bool = True,
        blur_prob: float = 0.5,
        blur_sigma: Union[float, Tuple[float, float]] = 0.6,
        blur_kernel_size: Union[int, Tuple[int, int]] = 3,
        use_noise: bool = False,
        input_range: Tuple[float, float] = (0.0, 1.0),
    ):
        super().__init__()
        self.downsample_first = downsample_first
        self.use_blur = use_blur
        self.blur_prob = blur_prob
        self.blur_sigma = tuple(blur_sigma) if isinstance(blur_sigma, (list, tuple)) else blur_sigma
        self.blur_kernel_size = (
            tuple(blur_kernel_size) if isinstance(blur_kernel_size, (list, tuple)) else blur_kernel_size
        )
        self.use_noise = use_noise
        self.input_range = input_range
        # A separate fixed linear schedule for the augmentation noise, independent of the U-Net's schedule.
        self.noise_schedule = GaussianDiffusion("linear", LOWRES_NOISE_TIMESTEPS) if use_noise else None

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        return image * 2 - 1 if self.input_range[0] == 0 else image

    def _unnormalize(self, image: torch.Tensor) -> torch.Tensor:
        return (image + 1) * 0.5 if self.input_range[0] == 0 else image

    def draw_blur(self) -> Tuple[bool, float, int]:
        """(blur this batch?, sigma, kernel size), drawn once per batch as the reference does.

        Drawn from torch's CPU generator (the reference uses Python's `random`), so that the RNG
        state a checkpoint carries covers them, and no device is synchronised.
        """
        if not self.use_blur or float(torch.rand(())) >= self.blur_prob:
            return False, 0.0, 0
        sigma = self.blur_sigma
        if isinstance(sigma, tuple):
            low, high = float(sigma[0]), float(sigma[1])
            sigma = low + (high - low) * float(torch.rand(()))
        size = self.blur_kernel_size
        if isinstance(size, tuple):
            size = int(torch.randint(int(size[0]), int(size[1]) + 1, ()))
        return True, float(sigma), int(size)

    def noise_image(
        self, image: torch.Tensor, level: torch.Tensor, noise: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Imagen's noise augmentation: q_sample of the (normalised) image at integer `level` (B,)."""
        assert self.noise_schedule is not None
        if noise is None:
            noise = torch.randn_like(image)
        noised = self.noise_schedule.q_sample(self._normalize(image), level, noise)
        return self._unnormalize(noised)

    def forward(
        self,
        image: torch.Tensor,
        *,
        target_size: int,
        downsample_size: int,
        blur: Optional[Tuple[bool, float, int]] = None,
        noise_level: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The training-time low-res input and its noise level (None without noise augmentation).

        blur / noise_level / noise fix the random draws (see `TrainingDraws`); None draws them.
        """
        cond = resize_image(image, downsample_size, self.input_range) if self.downsample_first else image
        do_blur, sigma, kernel_size = self.draw_blur() if blur is None else blur
        if do_blur:
            if kernel_size % 2 == 0:
                # The reference (kornia) rejects even kernels mid-training; the next odd size is used instead.
                kernel_size += 1
            cond = gaussian_blur(cond, sigma, kernel_size)
        cond = resize_image(cond, target_size, self.input_range)
        if self.noise_schedule is None:
            return cond, None
        if noise_level is None:
            noise_level = torch.randint(
                0, LOWRES_NOISE_TIMESTEPS, (cond.shape[0],), device=cond.device, dtype=torch.long
            )
        return self.noise_image(cond, noise_level, noise), noise_level
