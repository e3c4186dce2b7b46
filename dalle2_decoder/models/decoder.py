"""The cascaded diffusion decoder.

CONTRACT STUB: the signature below is the interface the configuration introspects
(`decoder` keys other than `unets` are checked against it). The model work replaces the body.
Per-U-Net options accept one value for all U-Nets or a list with one value per U-Net.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

from torch import nn

from .unet import Unet

PerUnet = Union  # marker only; see docstring


class Decoder(nn.Module):
    def __init__(
        self,
        unets: Sequence[Unet],
        *,
        image_sizes: Sequence[int],
        channels: int = 3,
        timesteps: int = 1000,
        sample_timesteps: Union[None, int, Sequence[Optional[int]]] = None,
        loss_type: str = "l2",
        beta_schedule: Union[None, str, Sequence[str]] = None,
        learned_variance: Union[bool, Sequence[bool]] = True,
        learned_variance_constrain_frac: bool = False,
        vb_loss_weight: float = 0.001,
        image_cond_drop_prob: float = 0.1,
        text_cond_drop_prob: float = 0.5,
        unconditional: bool = False,
        predict_x_start: Union[bool, Sequence[bool]] = False,
        predict_v: Union[bool, Sequence[bool]] = False,
        use_noise_for_lowres_cond: bool = False,
        use_blur_for_lowres_cond: bool = True,
        lowres_downsample_first: bool = True,
        blur_prob: float = 0.5,
        blur_sigma: Union[float, Tuple[float, float]] = 0.6,
        blur_kernel_size: Union[int, Tuple[int, int]] = 3,
        lowres_noise_sample_level: float = 0.2,
        clip_denoised: bool = True,
        clip_x_start: bool = True,
        use_dynamic_thres: bool = False,
        dynamic_thres_percentile: float = 0.95,
        p2_loss_weight_gamma: Union[float, Sequence[float]] = 0.0,
        p2_loss_weight_k: float = 1.0,
        min_snr_loss_weight: bool = False,
        min_snr_gamma: float = 5.0,
        ddim_sampling_eta: float = 0.0,
    ):
        super().__init__()
        raise NotImplementedError("Decoder: contract stub, replaced by the model work")
