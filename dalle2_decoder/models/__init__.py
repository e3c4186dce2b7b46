"""The decoder model: U-Nets (`unet`), diffusion math (`gaussian_diffusion`, `schedules`), the cascade (`decoder`)."""

from .decoder import Decoder
from .gaussian_diffusion import GaussianDiffusion
from .schedules import BETA_SCHEDULES, make_beta_schedule
from .unet import Unet

__all__ = ["Decoder", "GaussianDiffusion", "Unet", "BETA_SCHEDULES", "make_beta_schedule"]
