"""The cascaded diffusion decoder: U-Nets in order, each with its own noise schedule.

`decoder(image, image_embed=..., unet_number=n)` returns U-Net n's training loss (1-based, as
everywhere in this project); `decoder.sample(...)` runs the cascade and returns images.

By default every behaviour equals DALLE2-pytorch 1.15.6's `Decoder` (checked numerically by
tests/test_reference_parity_decoder.py); the options that differ from it are off by default and
listed in docs/MODEL.md ("Differences from DALLE2-pytorch").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..common.per_unet import per_unet
from ..common.problems import raise_problems
from ..common.progress import Meter, ProgressOutput, progress_output
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
from .gaussian_diffusion import GaussianDiffusion, ddim_timestep_pairs
from .lowres import LOWRES_NOISE_TIMESTEPS, LowresConditioner, resize_image
from .samplers import SAMPLER_NAMES, Generators, ModelOutput, Schedule, randn, run_sampler
from .schedules import beta_schedules_problems, default_beta_schedules
from .unet import Unet

NoiseFn = Callable[[Tuple[int, ...], torch.device, torch.dtype], torch.Tensor]
"""Where sampling draws its Gaussian noise: (shape, device, dtype) -> tensor."""
UnetCallHook = Callable[[int], None]
"""Called with a U-Net's number before each of its evaluations while sampling; may raise to abandon sampling."""


def _padded(value: Any, count: int, name: str, fill: Any) -> list:
    """A single value or a list, padded with `fill` to one entry per U-Net (the reference's learned_variance rule)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) > count:
        raise ValueError(f"Decoder: {name} has {len(values)} entries but there are only {count} U-Nets")
    return values + [fill] * (count - len(values))


def _upsampler_flags(value: Any, count: int, name: str) -> List[bool]:
    """use_noise / use_blur_for_lowres_cond: one value, or a list for the upsamplers (count - 1) or for all U-Nets."""
    if not isinstance(value, (list, tuple)):
        return [False] + [bool(value)] * (count - 1)
    values = [bool(v) for v in value]
    if len(values) == count - 1:
        values = [False] + values
    if len(values) != count:
        raise ValueError(
            f"Decoder: {name} has {len(values)} entries; give one per upsampler ({count - 1}) or per U-Net ({count})"
        )
    if values[0]:
        raise ValueError(f"Decoder: {name}[0] is true but U-Net 1 has no low-res input to augment")
    return values


class ReplayedNoise:
    """A `noise` source for `Decoder.sample` that hands out given tensors in order.

    For reproducing a run exactly (e.g. the noise DALLE2-pytorch drew, recorded by the reference
    fixtures). Each call must ask for the next tensor's shape; running out is an error.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.tensors = list(tensors)
        self.used = 0

    def __call__(self, shape: Tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if self.used >= len(self.tensors):
            raise ValueError(
                f"ReplayedNoise: sampling asked for noise tensor {self.used + 1} "
                f"but only {len(self.tensors)} were given"
            )
        tensor = self.tensors[self.used]
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"ReplayedNoise: noise tensor {self.used + 1} has shape {tuple(tensor.shape)}, "
                f"sampling asked for {tuple(shape)}"
            )
        self.used += 1
        return tensor.to(device=device, dtype=dtype)


@dataclass
class TrainingDraws:
    """Fixed values for the random draws of one training loss; any field left None is drawn.

    times: diffusion timesteps (B,); noise: the target noise (B, C, H, W); lowres_noise_level and
    lowres_noise: the upsampler's augmentation level (B,) and noise; blur: (blur?, sigma, kernel
    size) of the low-res input; self_cond: whether this batch is self-conditioned.
    """

    times: Optional[torch.Tensor] = None
    noise: Optional[torch.Tensor] = None
    lowres_noise_level: Optional[torch.Tensor] = None
    lowres_noise: Optional[torch.Tensor] = None
    blur: Optional[Tuple[bool, float, int]] = None
    self_cond: Optional[bool] = None


@dataclass
class Inpainting:
    """Inpainting inputs of one U-Net's sampling, already at its size: image in [-1, 1], mask (B, 1, H, W) bool."""

    image: torch.Tensor
    mask: torch.Tensor
    resample_times: int


class Decoder(nn.Module):
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

    def _x_start_from_prediction(
        self, objective: str, diffusion: GaussianDiffusion, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        if objective == "v":
            return diffusion.predict_start_from_v(x_t, t, pred)
        if objective == "x0":
            return pred
        return diffusion.predict_start_from_noise(x_t, t, pred)

    def _threshold(self, x_start: torch.Tensor) -> torch.Tensor:
        if not self.clip_x0:
            return x_start
        if not self.use_dynamic_thres:
            return x_start.clamp(-1.0, 1.0)
        # Imagen sec. 2.3: s = percentile of |x_0| per sample (at least 1), clamp to [-s, s], divide by s.
        s = torch.quantile(x_start.flatten(1).abs().float(), self.dynamic_thres_percentile, dim=1).clamp(min=1.0)
        s = s.to(x_start.dtype).reshape(-1, *([1] * (x_start.ndim - 1)))
        return x_start.clamp(-s, s) / s

    def _elementwise_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss_type == "l1":
            return F.l1_loss(pred, target, reduction="none")
        if self.loss_type == "huber":
            return F.smooth_l1_loss(pred, target, reduction="none")
        return F.mse_loss(pred, target, reduction="none")

    def _random_crop(self, crop: int, *images: torch.Tensor) -> List[torch.Tensor]:
        """The same random crop (one offset per sample, drawn on the CPU) of each batch."""
        b, _, h, w = images[0].shape
        tops = torch.randint(0, h - crop + 1, (b,)).tolist()
        lefts = torch.randint(0, w - crop + 1, (b,)).tolist()
        return [
            torch.stack(
                [img[i, :, top : top + crop, left : left + crop] for i, (top, left) in enumerate(zip(tops, lefts))]
            )
            for img in images
        ]

    # -------------------------------------------------------------------- training
    def forward(
        self,
        image: torch.Tensor,
        image_embed: Optional[torch.Tensor] = None,
        text_encodings: Optional[torch.Tensor] = None,
        *,
        text_mask: Optional[torch.Tensor] = None,
        unet_number: int = 1,
        draws: Optional[TrainingDraws] = None,
    ) -> torch.Tensor:
        """Training loss (a scalar tensor) of U-Net `unet_number` on images (B, C, H, W) in the input range.

        draws: fixed values for the random draws (timesteps, noise, augmentations), for exact
        reproduction; None draws them all. No backward, no host synchronisation.
        """
        index = self._index(unet_number)
        draws = draws or TrainingDraws()
        unet, diffusion = self.unets[index], self.diffusions[index]
        size = self.image_sizes[index]
        b, c, h, w = image.shape
        if c != self.channels:
            raise ValueError(f"Decoder: images have {c} channels, the decoder was built for {self.channels}")
        if h < size or w < size:
            raise ValueError(f"Decoder: images of {h}x{w} are smaller than U-Net {unet_number}'s size {size}")
        if self.image_conditioned[index] and image_embed is None:
            raise ValueError("Decoder: image_embed is required unless the decoder is unconditional")

        # Draw order equals the reference's: timesteps, then the low-res augmentation, then the noise.
        times = draws.times if draws.times is not None else diffusion.sample_timesteps(b, image.device)
        lowres_img, lowres_level = None, None
        if index > 0:
            lowres_img, lowres_level = self.lowres_conditioners[index](
                image,
                target_size=size,
                downsample_size=self.image_sizes[index - 1],
                blur=draws.blur,
                noise_level=draws.lowres_noise_level,
                noise=draws.lowres_noise,
            )
        target_image = resize_image(image, size)
        crop = self.random_crop_sizes[index]
        if crop is not None and crop < size:
            if lowres_img is None:
                (target_image,) = self._random_crop(crop, target_image)
            else:
                target_image, lowres_img = self._random_crop(crop, target_image, lowres_img)

        x_start = self.normalize(target_image)
        if lowres_img is not None:
            lowres_img = self.normalize(lowres_img)
        noise = draws.noise if draws.noise is not None else torch.randn_like(x_start)
        x_t = diffusion.q_sample(x_start, times, noise)
        unet_kwargs = dict(
            image_embed=image_embed if self.image_conditioned[index] else None,
            text_encodings=text_encodings if getattr(unet, "cond_on_text_encodings", False) else None,
            text_mask=text_mask,
            lowres_cond_img=lowres_img,
            lowres_noise_level=lowres_level,
        )
        objective = self._objective(index)

        self_cond = None
        if unet.self_cond:
            # Self-conditioning (Chen et al. 2022, Analog Bits, sec. 3.2): sometimes first estimate
            # without gradients (and without condition dropout) and feed the estimate back.
            if self.self_cond_x_start:
                with torch.no_grad():
                    first, _ = self._split_output(index, unet(x_t, times, **unet_kwargs).float())
                    estimate = self._x_start_from_prediction(objective, diffusion, first, x_t, times).clamp(-1, 1)
                use = (torch.rand(b, device=x_start.device) < self.self_cond_prob)[:, None, None, None]
                self_cond = torch.where(use, estimate, torch.zeros_like(estimate))
            else:
                # One draw per batch, as the reference (from torch's CPU generator, see LowresConditioner.draw_blur).
                use = draws.self_cond if draws.self_cond is not None else float(torch.rand(())) < self.self_cond_prob
                if use:
                    with torch.no_grad():
                        first, _ = self._split_output(index, unet(x_t, times, **unet_kwargs))
                        self_cond = first.detach()

        out = unet(
            x_t,
            times,
            self_cond=self_cond,
            image_cond_drop_prob=self.image_cond_drop_prob,
            text_cond_drop_prob=self.text_cond_drop_prob,
            **unet_kwargs,
        ).float()  # losses in fp32 under autocast
        pred, var_out = self._split_output(index, out)

        if objective == "v":
            target = diffusion.calculate_v(x_start, times, noise)
        elif objective == "x0":
            target = x_start
        else:
            target = noise
        loss = self._elementwise_loss(pred, target).flatten(1).mean(dim=1)
        if self.min_snr_loss_weight:
            loss = loss * diffusion.min_snr_loss_weight(times, self.min_snr_gamma, objective)
        if self.p2_loss_weight_gamma[index] > 0:
            loss = loss * diffusion.p2_loss_weight(times, self.p2_loss_weight_gamma[index], self.p2_loss_weight_k)
        loss = loss.mean()

        if var_out is not None:
            # Improved DDPM sec. 3.1: L_vlb trains only the variance, so the mean gets a stop-gradient.
            # As in the reference, the mean comes from the unclamped x_0, read from the prediction
            # as noise whatever the objective, unless vb_mean_from_objective.
            vb_objective = objective if self.vb_mean_from_objective else "eps"
            x_start_pred = self._x_start_from_prediction(vb_objective, diffusion, pred, x_t, times)
            model_mean, _ = diffusion.q_posterior(x_start_pred, x_t, times)
            model_log_variance = diffusion.model_log_variance(var_out, times, self.learned_variance_constrain_frac)
            vb = diffusion.vb_terms_bpd(x_start, x_t, times, model_mean.detach(), model_log_variance).mean()
            if self.vb_loss_scale_timesteps:
                # L_vlb = sum_t L_t is estimated by T * L_t at the sampled t (improved DDPM eq. 16).
                vb = vb * self.num_timesteps
            loss = loss + self.vb_loss_weight * vb
        return loss

    # -------------------------------------------------------------------- sampling
    def sample_unet(
        self,
        index: int,
        shape: Tuple[int, ...],
        *,
        cond_scale: float,
        unet_kwargs: dict,
        noise_fn: NoiseFn,
        device: torch.device,
        inpainting: Optional[Inpainting] = None,
        progress: Union[bool, ProgressOutput] = False,
        sampler: Optional[str] = None,
        steps: Optional[int] = None,
        on_unet_call: Optional[UnetCallHook] = None,
    ) -> torch.Tensor:
        """Sample one U-Net's images in [-1, 1] (the per-U-Net loop: DDPM, or DDIM with fewer steps).

        This is the one place a U-Net's denoising chain runs; other samplers hook in here. Noise
        is drawn through `noise_fn` in the reference's order, so that replayed noise reproduces it.
        """
        sampler, steps = self.sampler_for(index + 1, sampler, steps)
        if not (sampler == "ddim" or (sampler == "ddpm" and steps is None)):
            # Another sampler (samplers.py): the reference chains below stay as they are.
            if inpainting is not None:
                raise ValueError(
                    f"Decoder.sample: inpainting (RePaint) runs on the ddpm or ddim chain; U-Net {index + 1} "
                    f"samples with {sampler} {steps} steps"
                )
            return self._solve_unet(
                index,
                shape,
                sampler=sampler,
                steps=steps,
                cond_scale=cond_scale,
                unet_kwargs=unet_kwargs,
                noise_fn=noise_fn,
                device=device,
                progress=progress,
                on_unet_call=on_unet_call,
            )
        if sampler == "ddim" and steps is None:
            steps = self.num_timesteps  # DDIM over every timestep, not the DDPM chain
        unet, diffusion = self.unets[index], self.diffusions[index]
        objective = self._objective(index)
        b = shape[0]
        dtype = torch.float32
        if steps is None:
            pairs = [(t, t - 1) for t in reversed(range(self.num_timesteps))]
        else:
            pairs = ddim_timestep_pairs(self.num_timesteps, steps)
        resample_times = inpainting.resample_times if inpainting is not None else 1
        x = noise_fn(shape, device, dtype)
        x_start = None
        meter = _unet_meter(progress, f"sampling U-Net {index + 1} ({sampler}, {len(pairs)} steps)", len(pairs))
        try:
            for t_now, t_next in pairs:
                is_last = t_now == 0 if steps is None else t_next == 0
                t = torch.full((b,), t_now, device=device, dtype=torch.long)
                for r in reversed(range(resample_times)):
                    if inpainting is not None:
                        # RePaint (Lugmayr et al. 2022): the known region comes from the forward process at t.
                        known = diffusion.q_sample(inpainting.image, t, noise_fn(shape, device, dtype))
                        x = torch.where(inpainting.mask, known, x)
                    if on_unet_call is not None:
                        on_unet_call(index + 1)
                    self_cond = x_start if unet.self_cond else None
                    out = unet.forward_with_cond_scale(
                        x, t, cond_scale=cond_scale, self_cond=self_cond, **unet_kwargs
                    ).float()
                    pred, var_out = self._split_output(index, out)
                    x_start = self._threshold(self._x_start_from_prediction(objective, diffusion, pred, x, t))
                    if steps is None:
                        log_variance = (
                            None
                            if var_out is None
                            else diffusion.model_log_variance(var_out, t, self.learned_variance_constrain_frac)
                        )
                        x = diffusion.ddpm_step(x, t, x_start, log_variance, noise_fn(shape, device, dtype))
                        renoise_from = t - 1
                    else:
                        t_before = torch.full((b,), t_next, device=device, dtype=torch.long)
                        x = diffusion.ddim_step(
                            x,
                            t,
                            t_before,
                            x_start,
                            self.ddim_sampling_eta,
                            None if is_last else noise_fn(shape, device, dtype),
                        )
                        renoise_from = t_before
                    if inpainting is not None and not (is_last or r == 0):
                        # Resampling: go back to step t and denoise again, harmonising the two regions.
                        x = diffusion.q_sample_from_to(x, renoise_from, t, noise_fn(shape, device, dtype))
                meter.update(1)
        finally:
            meter.close()
        if inpainting is not None:
            x = torch.where(inpainting.mask, inpainting.image, x)
        return x

    def sampler_for(
        self, unet_number: int, sampler: Optional[str] = None, steps: Optional[int] = None
    ) -> Tuple[str, Optional[int]]:
        """(sampler name, steps; None: all timesteps) U-Net `unet_number` samples with; arguments override config."""
        index = self._index(unet_number)
        steps = steps if steps is not None else self.sample_timesteps[index]
        if steps is not None and not 1 <= steps <= self.num_timesteps:
            raise ValueError(
                f"Decoder.sample: sample_timesteps of U-Net {unet_number} must be in [1, {self.num_timesteps}], "
                f"got {steps}"
            )
        steps = None if steps == self.num_timesteps else steps
        name = sampler or self.samplers[index] or ("ddpm" if steps is None else "ddim")
        if name not in SAMPLER_NAMES:
            raise ValueError(f"Decoder.sample: unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
        return name, steps

    def _solve_unet(
        self,
        index: int,
        shape: Tuple[int, ...],
        *,
        sampler: str,
        steps: Optional[int],
        cond_scale: float,
        unet_kwargs: dict,
        noise_fn: NoiseFn,
        device: torch.device,
        progress: Union[bool, ProgressOutput],
        on_unet_call: Optional[UnetCallHook] = None,
    ) -> torch.Tensor:
        """One U-Net's images in [-1, 1] with a sampler of `samplers.py`, through a denoiser closure."""
        unet, diffusion = self.unets[index], self.diffusions[index]
        objective = self._objective(index)
        b = shape[0]
        x_start: List[Optional[torch.Tensor]] = [None]  # the last x_0 estimate, for self-conditioning

        def denoise(x: torch.Tensor, t_now: int) -> ModelOutput:
            if on_unet_call is not None:
                on_unet_call(index + 1)
            t = torch.full((b,), t_now, device=device, dtype=torch.long)
            self_cond = x_start[0] if unet.self_cond else None
            out = unet.forward_with_cond_scale(x, t, cond_scale=cond_scale, self_cond=self_cond, **unet_kwargs).float()
            pred, var_out = self._split_output(index, out)
            if unet.self_cond:
                x_start[0] = self._threshold(self._x_start_from_prediction(objective, diffusion, pred, x, t))
            if var_out is not None:  # improved DDPM eq. 15's interpolation fraction
                var_out = torch.sigmoid(var_out) if self.learned_variance_constrain_frac else (var_out + 1.0) / 2.0
            return ModelOutput(pred, var_out)

        schedule = Schedule.from_betas(diffusion.betas_float64(), objective, self._threshold)
        calls = steps or self.num_timesteps
        meter = _unet_meter(progress, f"sampling U-Net {index + 1} ({sampler}, {calls} steps)", calls)
        try:
            return run_sampler(
                sampler,
                denoise,
                schedule,
                noise_fn(shape, device, torch.float32),
                steps=steps,
                generator=noise_fn,
                callback=lambda i, t, x: meter.update(1),
                eta=self.ddim_sampling_eta,
            )
        finally:
            meter.close()

    def _inpainting(self, image: torch.Tensor, mask: torch.Tensor, size: int, resample_times: int) -> Inpainting:
        if mask.ndim != 3 or mask.shape[0] != image.shape[0] or mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                f"Decoder.sample: inpaint_mask must be (B, H, W) matching inpaint_image {tuple(image.shape)}, "
                f"got {tuple(mask.shape)}"
            )
        image = resize_image(self.normalize(image), size)
        mask = resize_image(mask[:, None].float(), size).bool()
        return Inpainting(image=image, mask=mask, resample_times=resample_times)

    @torch.no_grad()
    def sample(
        self,
        image_embed: Optional[torch.Tensor] = None,
        text_encodings: Optional[torch.Tensor] = None,
        *,
        text_mask: Optional[torch.Tensor] = None,
        cond_scale: Union[float, Sequence[float]] = 1.0,
        start_at_unet_number: int = 1,
        stop_at_unet_number: Optional[int] = None,
        image: Optional[torch.Tensor] = None,
        batch_size: Optional[int] = None,
        inpaint_image: Optional[torch.Tensor] = None,
        inpaint_mask: Optional[torch.Tensor] = None,
        inpaint_resample_times: int = 5,
        generator: Generators = None,
        seed: Union[None, int, Sequence[int]] = None,
        noise: Union[None, NoiseFn, Sequence[torch.Tensor]] = None,
        progress: Union[bool, ProgressOutput] = False,
        sampler: Union[None, str, Sequence[Optional[str]]] = None,
        sample_timesteps: Union[None, int, Sequence[Optional[int]]] = None,
        on_unet_call: Optional[UnetCallHook] = None,
    ) -> torch.Tensor:
        """Images in the input range ([0, 1] by default; not clamped) at the size of the last U-Net run.

        cond_scale: classifier-free guidance scale, one for all U-Nets or one per U-Net.
        image: images used as the low-res input when starting at an upsampler.
        batch_size: only needed when nothing else says it (an unconditional decoder).
        inpaint_image / inpaint_mask: images (B, C, H, W) and a bool mask (B, H, W), true where the
            image is kept; every U-Net fills in the rest (RePaint), resampling each step
            `inpaint_resample_times` times.
        generator / seed: make the sampling noise reproducible (seed builds a generator). A list of
            generators or seeds gives each sample its own: its image then depends on its seed alone,
            not on the batch it is sampled in.
        noise: instead, where the noise comes from: a function (shape, device, dtype) -> tensor, or
            a list of tensors used in order (see ReplayedNoise).
        progress: show the progress of each U-Net's sampling steps: True (a bar on a terminal, a line
            every 30 s elsewhere) or a `common.progress.ProgressOutput` saying how.
        sampler / sample_timesteps: override the configured sampler and steps, one for all or one per U-Net.
        on_unet_call: called with the U-Net's number before each U-Net evaluation; it may raise to
            abandon sampling (the training loop stops there when a stop signal arrives).
        """
        start = self._index(start_at_unet_number)
        stop = self._index(stop_at_unet_number if stop_at_unet_number is not None else len(self.unets))
        if stop < start:
            raise ValueError(f"stop_at_unet_number ({stop + 1}) is before start_at_unet_number ({start + 1})")
        if start > 0 and image is None:
            raise ValueError("Decoder.sample: image (the low-res input) is required when starting at an upsampler")
        if not self.unconditional and image_embed is None:
            raise ValueError("Decoder.sample: image_embed is required unless the decoder is unconditional")
        if (inpaint_image is None) != (inpaint_mask is None):
            raise ValueError(
                "Decoder.sample: give both inpaint_image and inpaint_mask (bool, (B, H, W)) to inpaint, or neither"
            )
        cond_scales = per_unet(cond_scale, len(self.unets), name="Decoder: cond_scale")
        if any(scale != 1 for scale in cond_scales[start : stop + 1]) and not self.can_classifier_guidance:
            raise ValueError(
                "Decoder.sample: cond_scale other than 1 needs a decoder trained with condition dropout "
                "(image_cond_drop_prob or text_cond_drop_prob above 0)"
            )
        device = next(self.parameters()).device
        if noise is None:
            if isinstance(seed, int):
                generator = torch.Generator(device=device).manual_seed(seed)
            elif seed is not None:
                generator = [torch.Generator(device=device).manual_seed(int(s)) for s in seed]

            def noise_fn(shape: Tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
                return randn(shape, generator, device, dtype)  # one generator per sample when a list
        elif callable(noise):
            noise_fn = noise
        else:
            noise_fn = ReplayedNoise(noise)
        for candidate in (image_embed, image, text_encodings, inpaint_image):
            if candidate is not None:
                batch_size = candidate.shape[0]
                break
        if batch_size is None:
            raise ValueError(
                "Decoder.sample: pass batch_size (no image_embed, image or text_encodings to infer it from)"
            )

        samplers = per_unet(sampler, len(self.unets), name="Decoder: sampler")
        steps_per_unet = per_unet(sample_timesteps, len(self.unets), name="Decoder: sample_timesteps")
        for number in range(start + 1, stop + 2):  # bad names or steps fail before any sampling
            self.sampler_for(number, samplers[number - 1], steps_per_unet[number - 1])

        was_training = self.training
        self.eval()
        try:
            current = (
                None if image is None else resize_image(image, self.image_sizes[start - 1]) if start > 0 else image
            )
            for index in range(start, stop + 1):
                size = self.image_sizes[index]
                shape = (batch_size, self.channels, size, size)
                lowres_img = lowres_level = None
                if index > 0:
                    lowres_img = self.unets[index].lowres_input(current, size, self.input_range)
                    conditioner = self.lowres_conditioners[index]
                    if conditioner.use_noise:
                        level = int(self.lowres_noise_sample_level * LOWRES_NOISE_TIMESTEPS)
                        lowres_level = torch.full((batch_size,), level, device=device, dtype=torch.long)
                        lowres_img = conditioner.noise_image(
                            lowres_img, lowres_level, noise_fn(tuple(lowres_img.shape), device, lowres_img.dtype)
                        )
                    lowres_img = self.normalize(lowres_img)
                unet = self.unets[index]
                unet_kwargs = dict(
                    image_embed=image_embed if self.image_conditioned[index] else None,
                    text_encodings=text_encodings if getattr(unet, "cond_on_text_encodings", False) else None,
                    text_mask=text_mask,
                    lowres_cond_img=lowres_img,
                    lowres_noise_level=lowres_level,
                )
                inpainting = None
                if inpaint_image is not None:
                    inpainting = self._inpainting(inpaint_image, inpaint_mask, size, inpaint_resample_times)
                x = self.sample_unet(
                    index,
                    shape,
                    cond_scale=cond_scales[index],
                    unet_kwargs=unet_kwargs,
                    noise_fn=noise_fn,
                    device=device,
                    inpainting=inpainting,
                    progress=progress,
                    sampler=samplers[index],
                    steps=steps_per_unet[index],
                    on_unet_call=on_unet_call,
                )
                current = self.unnormalize(x)
        finally:
            self.train(was_training)
        return current


def _unet_meter(progress: Union[bool, ProgressOutput], what: str, steps: int) -> Meter:
    """The meter of one U-Net's sampling steps: inside a phase with progress of its own, so no start and
    end lines, only the periodic ones (a long chain, e.g. 1000 DDPM steps at 1024px, still shows)."""
    output = progress_output(progress) or ProgressOutput(enabled=False)
    return output.meter(what, total=steps, unit="steps", boundaries=False)
