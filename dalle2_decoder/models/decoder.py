"""The cascaded diffusion decoder: U-Nets in order, each with its own noise schedule.

`decoder(image, image_embed=..., unet_number=n)` returns U-Net n's training loss (1-based, as
everywhere in this project); `decoder.sample(...)` runs the cascade and returns images.

This module holds the constructor (what the cascade imposes on each U-Net) and the helpers both
halves share; the training loss is `decoder_training.py`, sampling `decoder_sampling.py` (every
chain in `samplers/`), and the noise sources `noise.py`.

By default every behaviour equals DALLE2-pytorch 1.15.6's `Decoder` (checked numerically by
tests/test_reference_parity_decoder.py); the options that differ from it are off by default and
listed in docs/MODEL.md ("Differences from DALLE2-pytorch").
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..common.per_unet import per_unet
from ..common.problems import raise_problems
from ._compat import warn_no_effect
from .cascade_rules import LOSS_TYPES as LOSS_TYPES
from .cascade_rules import (
    augmentation_problems,
    image_sizes_problems,
    loss_type_problems,
    sample_steps_problems,
    sampler_problems,
    upsampler_flags,
)
from .decoder_sampling import DecoderSampling, UnetCallHook
from .decoder_training import DecoderTraining, TrainingDraws
from .gaussian_diffusion import GaussianDiffusion
from .lowres import LowresConditioner
from .noise import NoiseFn, ReplayedNoise
from .samplers import Inpainting
from .schedules import beta_schedules_problems, default_beta_schedules
from .unet import Unet

# Names of the Decoder's inputs, importable from here as from the modules that define them.
__all__ = ["Decoder", "Inpainting", "LOSS_TYPES", "NoiseFn", "ReplayedNoise", "TrainingDraws", "UnetCallHook"]


def _padded(value: Any, count: int, name: str, fill: Any) -> list:
    """A single value or a list, padded with `fill` to one entry per U-Net (the reference's learned_variance rule)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) > count:
        raise ValueError(f"Decoder: {name} has {len(values)} entries but there are only {count} U-Nets")
    return values + [fill] * (count - len(values))


class Decoder(DecoderTraining, DecoderSampling, nn.Module):
    """DALL-E 2 decoder: a cascade of diffusion U-Nets conditioned on CLIP embeddings.

    Args (names and defaults follow DALLE2-pytorch so that its configs load unchanged):
        unets: the U-Nets, base model first; rebuilt where the Decoder must impose settings.
        image_sizes: output resolution of each U-Net, increasing.
        channels: image channels.
        timesteps: diffusion steps of training and of full (DDPM) sampling.
        sample_timesteps: DDIM steps at sampling, per U-Net; None (or == timesteps) samples the full DDPM chain.
            With `samplers`, the number of network calls of the chosen sampler (None: timesteps).
        samplers: sampler per U-Net (see `samplers.SAMPLER_NAMES`); None keeps the reference's choice:
            DDPM, or DDIM where sample_timesteps is set.
        loss_type: l1, l2 or huber (smooth L1).
        beta_schedule: noise schedule per U-Net (cosine, linear, quadratic, jsd, sigmoid); None: cosine,
            and linear for the last U-Net of a cascade.
        learned_variance: also predict the variance (hybrid loss of improved DDPM); one value or a list,
            padded with False: `True` means the first U-Net only.
        learned_variance_constrain_frac: squash the variance interpolation fraction with a sigmoid.
        vb_loss_weight: lambda of L_hybrid = L_simple + lambda * L_vlb.
        image_cond_drop_prob: probability of replacing a sample's image embedding by the null one (guidance).
        text_cond_drop_prob: probability of replacing a sample's text encodings by the null ones (guidance).
        unconditional: no image-embedding or text conditioning at all.
        predict_x_start: per U-Net, the network predicts x_0 instead of the noise.
        predict_v: per U-Net, the network predicts v (Salimans & Ho 2022) instead of the noise.
        use_noise_for_lowres_cond: noise-augment the upsamplers' low-res input; one value or a list
            (per upsampler, or per U-Net with False first).
        use_blur_for_lowres_cond: blur-augment the upsamplers' low-res input in training; as above.
        lowres_downsample_first: build the low-res input by downsampling to the previous U-Net's size first.
        blur_prob: probability that a batch's low-res input is blurred.
        blur_sigma: blur sigma, or a (low, high) range drawn from per batch.
        blur_kernel_size: odd blur kernel size, or a (low, high) range drawn from per batch.
        lowres_noise_sample_level: augmentation noise level (fraction of 1000 steps) used at sampling.
        clip_denoised: clamp (or dynamically threshold) the predicted x_0 at sampling; false leaves it
            unclamped (the reference ignores this option and always clamps).
        clip_x_start: the same, under the reference's other name; x_0 is clamped only when both are true.
        use_dynamic_thres: clamp x_0 by dynamic thresholding (Imagen sec. 2.3) instead of to [-1, 1].
        dynamic_thres_percentile: percentile of |x_0| used as the dynamic threshold.
        p2_loss_weight_gamma: per U-Net, P2 weighting gamma (0 disables it).
        p2_loss_weight_k: P2 weighting k.
        ddim_sampling_eta: DDIM eta (0: deterministic DDIM, 1: DDPM-like noise).
        auto_normalize_img: images are given and returned in [0, 1] (False: in [-1, 1]).
        random_crop_sizes: per U-Net, train upsamplers on random crops of this size (None: whole image).
        image_size: accepted for compatibility; no effect (image_sizes sets the resolutions).
        vae: accepted for compatibility; no effect (no latent diffusion here).
        predict_x_start_for_latent_diffusion: accepted for compatibility; no effect.
        clip_adapter_overrides: accepted for compatibility; no effect (CLIP lives outside the Decoder).

    Options of this package, off by default (DALLE2-pytorch behaves as with the default):
        image_embed_all_unets: condition every U-Net, not only the first, on the image embedding.
        vb_loss_scale_timesteps: multiply L_vlb by T (improved DDPM eq. 16's sum over steps).
        vb_mean_from_objective: in L_vlb, derive the model mean from the U-Net's own objective (x_0 or
            v); the reference always reads the prediction as noise there.
        min_snr_loss_weight: weight the loss by min(SNR, min_snr_gamma) (Min-SNR, Hang et al. 2023).
        min_snr_gamma: the Min-SNR clip value.
        noise_schedule_shift: per U-Net, s > 0: its schedule's log-SNR shifted by 2 log(s) (Hoogeboom et al.
            2023's shifted schedules; s = r0 / image_size moves a schedule tuned at r0 pixels to a U-Net's size).
        self_cond_prob: how often a batch is self-conditioned in training (the reference: 0.5).
        self_cond_x_start: self-condition on the clamped x_0 estimate, drawn per sample (the reference
            feeds the raw prediction, one draw per batch).
    """

    def __init__(
        self,
        unets: Union[Unet, Sequence[Unet]],
        *,
        image_sizes: Sequence[int],
        channels: int = 3,
        timesteps: int = 1000,
        sample_timesteps: Union[None, int, Sequence[Optional[int]]] = None,
        samplers: Union[None, str, Sequence[Optional[str]]] = None,
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
        use_noise_for_lowres_cond: Union[bool, Sequence[bool]] = False,
        use_blur_for_lowres_cond: Union[bool, Sequence[bool]] = True,
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
        ddim_sampling_eta: float = 0.0,
        auto_normalize_img: bool = True,
        random_crop_sizes: Union[None, int, Sequence[Optional[int]]] = None,
        image_size: Optional[int] = None,
        vae: Sequence[Any] = (),
        predict_x_start_for_latent_diffusion: bool = False,
        clip_adapter_overrides: Optional[dict] = None,
        # Options of this package (off by default).
        image_embed_all_unets: bool = False,
        vb_loss_scale_timesteps: bool = False,
        vb_mean_from_objective: bool = False,
        min_snr_loss_weight: bool = False,
        min_snr_gamma: float = 5.0,
        noise_schedule_shift: Union[float, Sequence[float]] = 1.0,
        self_cond_prob: float = 0.5,
        self_cond_x_start: bool = False,
    ):
        super().__init__()
        warn_no_effect("Decoder", "vae", tuple(vae), ())
        warn_no_effect("Decoder", "predict_x_start_for_latent_diffusion", predict_x_start_for_latent_diffusion, False)
        warn_no_effect("Decoder", "clip_adapter_overrides", clip_adapter_overrides or {}, {})
        del image_size  # the reference ignores it too when image_sizes is given

        unet_list = [unets] if isinstance(unets, Unet) else list(unets)
        n = len(unet_list)
        if n == 0:
            raise ValueError("Decoder: needs at least one U-Net")
        raise_problems(
            "Decoder",
            image_sizes_problems("image_sizes", list(image_sizes), n, "unets")
            + loss_type_problems("loss_type", loss_type)
            + beta_schedules_problems("beta_schedule", beta_schedule, n, timesteps)
            + sample_steps_problems("sample_timesteps", sample_timesteps, n, timesteps)
            + sampler_problems("samplers", samplers)
            + augmentation_problems("", use_noise_for_lowres_cond, use_blur_for_lowres_cond, n),
        )
        self.image_sizes = [int(s) for s in per_unet(list(image_sizes), n, name="Decoder: image_sizes")]

        self.channels = channels
        self.num_timesteps = timesteps
        self.loss_type = loss_type
        self.unconditional = unconditional
        self.learned_variance = [bool(v) for v in _padded(learned_variance, n, "learned_variance", False)]
        self.learned_variance_constrain_frac = learned_variance_constrain_frac
        self.vb_loss_weight = vb_loss_weight
        self.vb_loss_scale_timesteps = vb_loss_scale_timesteps
        self.vb_mean_from_objective = vb_mean_from_objective
        self.image_cond_drop_prob = image_cond_drop_prob
        self.text_cond_drop_prob = text_cond_drop_prob
        self.can_classifier_guidance = image_cond_drop_prob > 0 or text_cond_drop_prob > 0
        self.predict_x_start = [bool(v) for v in per_unet(predict_x_start, n, name="Decoder: predict_x_start")]
        self.predict_v = [bool(v) for v in per_unet(predict_v, n, name="Decoder: predict_v")]
        self.clip_x0 = clip_denoised and clip_x_start
        self.use_dynamic_thres = use_dynamic_thres
        self.dynamic_thres_percentile = dynamic_thres_percentile
        self.p2_loss_weight_gamma = [
            float(g) for g in per_unet(p2_loss_weight_gamma, n, name="Decoder: p2_loss_weight_gamma")
        ]
        self.p2_loss_weight_k = p2_loss_weight_k
        self.min_snr_loss_weight = min_snr_loss_weight
        self.min_snr_gamma = min_snr_gamma
        self.ddim_sampling_eta = ddim_sampling_eta
        self.self_cond_prob = self_cond_prob
        self.self_cond_x_start = self_cond_x_start
        self.auto_normalize_img = auto_normalize_img
        self.input_range = (0.0, 1.0) if auto_normalize_img else (-1.0, 1.0)
        self.lowres_noise_sample_level = lowres_noise_sample_level
        self.random_crop_sizes = per_unet(random_crop_sizes, n, name="Decoder: random_crop_sizes")
        if self.random_crop_sizes[0] is not None:
            raise ValueError("Decoder: random_crop_sizes applies to upsamplers only; U-Net 1 must have None")

        self.sample_timesteps: List[Optional[int]] = [
            None if steps == timesteps else steps
            for steps in per_unet(sample_timesteps, n, name="Decoder: sample_timesteps")
        ]
        self.samplers: List[Optional[str]] = per_unet(samplers, n, name="Decoder: samplers")

        schedules = (
            default_beta_schedules(n)
            if beta_schedule is None
            else per_unet(beta_schedule, n, name="Decoder: beta_schedule")
        )
        self.beta_schedules = list(schedules)
        shifts = [float(s) for s in per_unet(noise_schedule_shift, n, name="Decoder: noise_schedule_shift")]
        for i, shift in enumerate(shifts):
            if not shift > 0:
                raise ValueError(f"Decoder: noise_schedule_shift of U-Net {i + 1} must be positive, got {shift}")
        self.diffusions = nn.ModuleList(GaussianDiffusion(s, timesteps, shift) for s, shift in zip(schedules, shifts))

        use_noise = upsampler_flags(use_noise_for_lowres_cond, n)
        use_blur = upsampler_flags(use_blur_for_lowres_cond, n)

        # Impose what the cascade needs on each U-Net (as the reference does): upsamplers see the
        # low-res image, only the first sees the image embedding (unless image_embed_all_unets),
        # outputs match the variance mode.
        self.image_conditioned = [not unconditional and (i == 0 or image_embed_all_unets) for i in range(n)]
        casted = []
        for i, unet in enumerate(unet_list):
            if self.image_conditioned[i] and unet.config["image_embed_dim"] is None:
                raise ValueError(
                    f"Decoder: U-Net {i + 1} (decoder.unets[{i}]) needs image_embed_dim: it is conditioned "
                    "on the image embedding"
                )
            casted.append(
                unet.with_settings(
                    channels=channels,
                    channels_out=channels * (2 if self.learned_variance[i] else 1),
                    lowres_cond=i > 0,
                    lowres_noise_cond=use_noise[i],
                    cond_on_image_embeds=self.image_conditioned[i],
                    cond_on_text_encodings=unet.config["cond_on_text_encodings"] and not unconditional,
                )
            )
        self.unets = nn.ModuleList(casted)
        self.lowres_conditioners = nn.ModuleList(
            nn.Identity()
            if i == 0
            else LowresConditioner(
                downsample_first=lowres_downsample_first,
                use_blur=use_blur[i],
                blur_prob=blur_prob,
                blur_sigma=blur_sigma,
                blur_kernel_size=blur_kernel_size,
                use_noise=use_noise[i],
                input_range=self.input_range,
            )
            for i in range(n)
        )

    # -------------------------------------------------------------------- helpers
    @property
    def num_unets(self) -> int:
        return len(self.unets)

    @property
    def condition_on_text_encodings(self) -> bool:
        """Whether any U-Net is given text encodings."""
        return any(getattr(unet, "cond_on_text_encodings", False) for unet in self.unets)

    def _index(self, unet_number: int) -> int:
        if not 1 <= unet_number <= len(self.unets):
            raise ValueError(
                f"unet_number must be in 1..{len(self.unets)} (U-Nets are numbered from 1), got {unet_number}"
            )
        return unet_number - 1

    def get_unet(self, unet_number: int) -> Unet:
        """The U-Net with this 1-based number."""
        return self.unets[self._index(unet_number)]

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """Input range -> the diffusion's [-1, 1]."""
        return image * 2 - 1 if self.auto_normalize_img else image

    def unnormalize(self, image: torch.Tensor) -> torch.Tensor:
        """The diffusion's [-1, 1] -> output range (not clamped, as the reference)."""
        return (image + 1) * 0.5 if self.auto_normalize_img else image

    def _objective(self, index: int) -> str:
        return "v" if self.predict_v[index] else ("x0" if self.predict_x_start[index] else "eps")

    def _split_output(self, index: int, out: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.learned_variance[index]:
            pred, var = out.chunk(2, dim=1)
            return pred, var
        return out, None

    def _threshold(self, x_start: torch.Tensor) -> torch.Tensor:
        if not self.clip_x0:
            return x_start
        if not self.use_dynamic_thres:
            return x_start.clamp(-1.0, 1.0)
        # Imagen sec. 2.3: s = percentile of |x_0| per sample (at least 1), clamp to [-s, s], divide by s.
        s = torch.quantile(x_start.flatten(1).abs().float(), self.dynamic_thres_percentile, dim=1).clamp(min=1.0)
        s = s.to(x_start.dtype).reshape(-1, *([1] * (x_start.ndim - 1)))
        return x_start.clamp(-s, s) / s

    def _unet_kwargs(
        self,
        index: int,
        image_embed: Optional[torch.Tensor],
        text_encodings: Optional[torch.Tensor],
        text_mask: Optional[torch.Tensor],
        lowres_img: Optional[torch.Tensor],
        lowres_level: Optional[torch.Tensor],
    ) -> dict:
        """The conditions U-Net `index + 1` is called with, in training and sampling: each only where it takes it."""
        return dict(
            image_embed=image_embed if self.image_conditioned[index] else None,
            text_encodings=text_encodings if getattr(self.unets[index], "cond_on_text_encodings", False) else None,
            text_mask=text_mask,
            lowres_cond_img=lowres_img,
            lowres_noise_level=lowres_level,
        )
