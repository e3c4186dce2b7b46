"""The cascaded diffusion decoder: U-Nets in order, each with its own noise schedule.

`decoder(image, image_embed=..., unet_number=n)` returns U-Net n's training loss (1-based, as
everywhere in this project); `decoder.sample(...)` runs the cascade and returns images in [0, 1].
Per-U-Net options accept one value for all U-Nets or a list with one value per U-Net.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._compat import warn_no_effect
from .gaussian_diffusion import GaussianDiffusion
from .lowres import LowresConditioner, resize_image
from .samplers import SAMPLER_NAMES, Generators, ModelOutput, Schedule, randn, run_sampler
from .schedules import make_beta_schedule
from .unet import Unet

LOSS_TYPES = ("l1", "l2", "huber")


def _per_unet(value: Any, count: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"Decoder: {name} has {len(value)} entries but there are {count} U-Nets")
        return list(value)
    return [value] * count


class Decoder(nn.Module):
    """DALL-E 2 decoder: a cascade of diffusion U-Nets conditioned on CLIP embeddings.

    Args (names follow DALLE2-pytorch so that its configs load unchanged):
        unets: the U-Nets, base model first; rebuilt where the Decoder must impose settings.
        image_sizes: output resolution of each U-Net, increasing.
        channels: image channels.
        timesteps: diffusion steps of training and of full (DDPM) sampling.
        sample_timesteps: DDIM steps at sampling, per U-Net; None (or == timesteps) samples the full DDPM chain.
            With `samplers`, the number of network calls of the chosen sampler (None: timesteps).
        samplers: sampler per U-Net (see `samplers.SAMPLER_NAMES`); None keeps the reference's choice:
            DDPM, or DDIM where sample_timesteps is set.
        loss_type: l1, l2 or huber (smooth L1).
        beta_schedule: noise schedule per U-Net: cosine (default), linear, quadratic, jsd or sigmoid.
        learned_variance: per U-Net, also predict the variance and train it with the hybrid loss of improved DDPM.
        learned_variance_constrain_frac: squash the variance interpolation with a sigmoid instead of (v + 1) / 2.
        vb_loss_weight: lambda of L_hybrid = L_simple + lambda * L_vlb (L_vlb summed over the T steps).
        image_cond_drop_prob: probability of replacing a sample's image embedding by the null one (guidance).
        text_cond_drop_prob: probability of replacing a sample's text encodings by the null ones (guidance).
        unconditional: no image-embedding or text conditioning at all.
        predict_x_start: per U-Net, the network predicts x_0 instead of the noise.
        predict_v: per U-Net, the network predicts v (Salimans & Ho 2022) instead of the noise.
        use_noise_for_lowres_cond: noise-augment the upsamplers' low-res input (and condition on its level).
        use_blur_for_lowres_cond: blur-augment the upsamplers' low-res input during training.
        lowres_downsample_first: build the low-res input by downsampling to the previous U-Net's size first.
        blur_prob: probability that a sample's low-res input is blurred.
        blur_sigma: blur sigma, or a (low, high) range drawn from per sample.
        blur_kernel_size: blur kernel size, or a range (its largest value is used).
        lowres_noise_sample_level: augmentation noise level (fraction of timesteps) used at sampling.
        clip_denoised: clamp the predicted x_0 to [-1, 1] during sampling.
        clip_x_start: reference alias; x_0 is clamped only when both clip_denoised and clip_x_start are true.
        use_dynamic_thres: clamp x_0 by dynamic thresholding (Imagen sec. 2.3) instead of to [-1, 1].
        dynamic_thres_percentile: percentile of |x_0| used as the dynamic threshold.
        p2_loss_weight_gamma: per U-Net, P2 weighting gamma (0 disables it).
        p2_loss_weight_k: P2 weighting k.
        min_snr_loss_weight: weight the loss by min(SNR, min_snr_gamma) (Min-SNR).
        min_snr_gamma: the Min-SNR clip value.
        ddim_sampling_eta: DDIM eta (0: deterministic DDIM, 1: DDPM-like noise).
        self_cond_prob: for U-Nets with self_cond, how often training feeds the model its own x_0 estimate.
        image_size: accepted for compatibility; no effect (image_sizes sets the resolutions).
        random_crop_sizes: per U-Net, train on random crops of this size (None: whole image).
        vae: accepted for compatibility; no effect (no latent diffusion here).
        predict_x_start_for_latent_diffusion: accepted for compatibility; no effect.
        clip_adapter_overrides: accepted for compatibility; no effect (CLIP lives outside the Decoder).
        auto_normalize_img: accepted for compatibility; no effect (images are always given in [0, 1]).
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
        self_cond_prob: float = 0.5,
        image_size: Optional[int] = None,
        random_crop_sizes: Union[None, int, Sequence[Optional[int]]] = None,
        vae: Sequence[Any] = (),
        predict_x_start_for_latent_diffusion: bool = False,
        clip_adapter_overrides: Optional[dict] = None,
        auto_normalize_img: bool = True,
    ):
        super().__init__()
        warn_no_effect("Decoder", "vae", tuple(vae), ())
        warn_no_effect("Decoder", "predict_x_start_for_latent_diffusion", predict_x_start_for_latent_diffusion, False)
        warn_no_effect("Decoder", "clip_adapter_overrides", clip_adapter_overrides or {}, {})
        warn_no_effect("Decoder", "auto_normalize_img", auto_normalize_img, True)
        del image_size  # the reference ignores it too; image_sizes is what counts

        unet_list = [unets] if isinstance(unets, Unet) else list(unets)
        n = len(unet_list)
        if n == 0:
            raise ValueError("Decoder: needs at least one U-Net")
        self.image_sizes = [int(s) for s in _per_unet(list(image_sizes), n, "image_sizes")]
        if any(b <= a for a, b in zip(self.image_sizes, self.image_sizes[1:])):
            raise ValueError(f"Decoder: image_sizes must increase, got {self.image_sizes}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"Decoder: unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")

        self.channels = channels
        self.num_timesteps = timesteps
        self.loss_type = loss_type
        self.unconditional = unconditional
        self.learned_variance = [bool(v) for v in _per_unet(learned_variance, n, "learned_variance")]
        self.learned_variance_constrain_frac = learned_variance_constrain_frac
        self.vb_loss_weight = vb_loss_weight
        self.image_cond_drop_prob = 0.0 if unconditional else image_cond_drop_prob
        self.text_cond_drop_prob = 0.0 if unconditional else text_cond_drop_prob
        self.predict_x_start = [bool(v) for v in _per_unet(predict_x_start, n, "predict_x_start")]
        self.predict_v = [bool(v) for v in _per_unet(predict_v, n, "predict_v")]
        for i, (x0, v) in enumerate(zip(self.predict_x_start, self.predict_v)):
            if x0 and v:
                raise ValueError(f"Decoder: U-Net {i + 1} sets both predict_x_start and predict_v; choose one")
        self.clip_x0 = clip_denoised and clip_x_start
        self.use_dynamic_thres = use_dynamic_thres
        self.dynamic_thres_percentile = dynamic_thres_percentile
        self.p2_loss_weight_gamma = [float(g) for g in _per_unet(p2_loss_weight_gamma, n, "p2_loss_weight_gamma")]
        self.p2_loss_weight_k = p2_loss_weight_k
        self.min_snr_loss_weight = min_snr_loss_weight
        self.min_snr_gamma = min_snr_gamma
        self.ddim_sampling_eta = ddim_sampling_eta
        self.self_cond_prob = self_cond_prob
        self.random_crop_sizes = _per_unet(random_crop_sizes, n, "random_crop_sizes")
        if self.random_crop_sizes[0] is not None:
            raise ValueError("Decoder: random_crop_sizes applies to upsamplers only; U-Net 1 must have None")

        self.sample_timesteps: List[Optional[int]] = []
        for i, steps in enumerate(_per_unet(sample_timesteps, n, "sample_timesteps")):
            if steps is not None and not 1 <= steps <= timesteps:
                raise ValueError(f"Decoder: sample_timesteps of U-Net {i + 1} must be in [1, {timesteps}], got {steps}")
            self.sample_timesteps.append(None if steps == timesteps else steps)

        self.samplers: List[Optional[str]] = _per_unet(samplers, n, "samplers")
        for i, name in enumerate(self.samplers):
            if name is not None and name not in SAMPLER_NAMES:
                raise ValueError(f"Decoder: unknown sampler {name!r} for U-Net {i + 1}; choose one of {', '.join(SAMPLER_NAMES)}")

        schedules = [s if s is not None else "cosine" for s in _per_unet(beta_schedule, n, "beta_schedule")]
        self.diffusions = nn.ModuleList(GaussianDiffusion(s, timesteps) for s in schedules)

        # Impose what the cascade needs on each U-Net (as the reference does): upsamplers see the
        # low-res image, all see the image embedding unless unconditional, outputs match the variance mode.
        casted = []
        for i, unet in enumerate(unet_list):
            if not unconditional and unet.config["image_embed_dim"] is None:
                raise ValueError(f"Decoder: U-Net {i + 1} (decoder.unets[{i}]) needs image_embed_dim unless unconditional")
            casted.append(
                unet.with_settings(
                    channels=channels,
                    channels_out=channels * (2 if self.learned_variance[i] else 1),
                    lowres_cond=i > 0,
                    lowres_noise_cond=i > 0 and use_noise_for_lowres_cond,
                    cond_on_image_embeds=not unconditional,
                    cond_on_text_encodings=unet.config["cond_on_text_encodings"] and not unconditional,
                )
            )
        self.unets = nn.ModuleList(casted)
        self.lowres_conditioner = LowresConditioner(
            timesteps=timesteps,
            downsample_first=lowres_downsample_first,
            use_blur=use_blur_for_lowres_cond,
            blur_prob=blur_prob,
            blur_sigma=blur_sigma,
            blur_kernel_size=blur_kernel_size,
            use_noise=use_noise_for_lowres_cond,
            noise_sample_level=lowres_noise_sample_level,
        )

    # -------------------------------------------------------------------- helpers
    @property
    def num_unets(self) -> int:
        return len(self.unets)

    def _index(self, unet_number: int) -> int:
        if not 1 <= unet_number <= len(self.unets):
            raise ValueError(f"unet_number must be in 1..{len(self.unets)} (U-Nets are numbered from 1), got {unet_number}")
        return unet_number - 1

    def get_unet(self, unet_number: int) -> Unet:
        """The U-Net with this 1-based number."""
        return self.unets[self._index(unet_number)]

    def _objective(self, index: int) -> str:
        return "x0" if self.predict_x_start[index] else ("v" if self.predict_v[index] else "eps")

    def _split_output(self, index: int, out: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.learned_variance[index]:
            pred, var = out.chunk(2, dim=1)
            return pred, var
        return out, None

    def _x_start_from_prediction(self, index: int, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        diffusion = self.diffusions[index]
        objective = self._objective(index)
        if objective == "x0":
            return pred
        if objective == "v":
            return diffusion.predict_start_from_v(x_t, t, pred)
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

    def _lowres_input(
        self, index: int, image: torch.Tensor, *, training: bool, generator: Optional[torch.Generator] = None
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if index == 0:
            return None, None
        return self.lowres_conditioner(
            image, self.image_sizes[index - 1], self.image_sizes[index], training=training, generator=generator
        )

    # -------------------------------------------------------------------- training
    def forward(
        self,
        image: torch.Tensor,
        image_embed: Optional[torch.Tensor] = None,
        text_encodings: Optional[torch.Tensor] = None,
        *,
        text_mask: Optional[torch.Tensor] = None,
        unet_number: int = 1,
    ) -> torch.Tensor:
        """Training loss (a scalar tensor) of U-Net `unet_number` on images (B, C, H, W) in [0, 1].

        No backward, no host synchronisation: the caller owns the optimisation step.
        """
        index = self._index(unet_number)
        unet, diffusion = self.unets[index], self.diffusions[index]
        size = self.image_sizes[index]
        if not self.unconditional and image_embed is None:
            raise ValueError("Decoder: image_embed is required unless the decoder is unconditional")

        lowres_img, lowres_level = self._lowres_input(index, image, training=True)
        x_start = resize_image(image, size).clamp(0, 1) * 2 - 1
        crop = self.random_crop_sizes[index]
        if crop is not None and crop < size:
            # One offset for the whole batch, drawn on the CPU generator (no device synchronisation),
            # applied identically to the target and its low-res input.
            top, left = (int(v) for v in torch.randint(0, size - crop + 1, (2,)))
            x_start = x_start[..., top : top + crop, left : left + crop]
            lowres_img = lowres_img[..., top : top + crop, left : left + crop]

        b = x_start.shape[0]
        t = diffusion.sample_timesteps(b, x_start.device)
        noise = torch.randn_like(x_start)
        x_t = diffusion.q_sample(x_start, t, noise)
        unet_kwargs = dict(
            image_embed=image_embed,
            text_encodings=text_encodings,
            text_mask=text_mask,
            lowres_cond_img=lowres_img,
            lowres_noise_level=lowres_level,
            image_cond_drop_prob=self.image_cond_drop_prob,
            text_cond_drop_prob=self.text_cond_drop_prob,
        )

        self_cond = None
        if unet.self_cond:
            # Self-conditioning (Chen et al. 2022, Analog Bits, sec. 3.2): half the time, first estimate x_0
            # without gradients and feed it back; always computed and masked, so no data-dependent branch.
            with torch.no_grad():
                first, _ = self._split_output(index, unet(x_t, t, **unet_kwargs).float())
                estimate = self._x_start_from_prediction(index, first, x_t, t).clamp(-1, 1)
            use = (torch.rand(b, device=x_start.device) < self.self_cond_prob)[:, None, None, None]
            self_cond = torch.where(use, estimate, torch.zeros_like(estimate))

        out = unet(x_t, t, self_cond=self_cond, **unet_kwargs).float()  # losses in fp32 under autocast
        pred, var_out = self._split_output(index, out)

        objective = self._objective(index)
        if objective == "x0":
            target = x_start
        elif objective == "v":
            target = diffusion.calculate_v(x_start, t, noise)
        else:
            target = noise
        loss = self._elementwise_loss(pred, target).flatten(1).mean(dim=1)
        if self.min_snr_loss_weight:
            loss = loss * diffusion.min_snr_loss_weight(t, self.min_snr_gamma, objective)
        if self.p2_loss_weight_gamma[index] > 0:
            loss = loss * diffusion.p2_loss_weight(t, self.p2_loss_weight_gamma[index], self.p2_loss_weight_k)
        loss = loss.mean()

        if var_out is not None:
            # Improved DDPM sec. 3.1: L_vlb trains only the variance, so the mean gets a stop-gradient.
            x_start_pred = self._x_start_from_prediction(index, pred.detach(), x_t, t)
            model_mean, _ = diffusion.q_posterior(x_start_pred, x_t, t)
            model_log_variance = diffusion.model_log_variance(var_out, t, self.learned_variance_constrain_frac)
            vb = diffusion.vb_terms_bpd(x_start, x_t, t, model_mean, model_log_variance)
            # L_vlb = sum_t L_t is estimated by T * L_t at the sampled t (improved DDPM eq. 16).
            loss = loss + self.vb_loss_weight * self.num_timesteps * vb.mean()
        return loss

    # -------------------------------------------------------------------- sampling
    def sampler_for(self, unet_number: int, sampler: Optional[str] = None, steps: Optional[int] = None) -> Tuple[str, Optional[int]]:
        """(sampler name, steps) U-Net `unet_number` samples with; arguments override the configured ones."""
        index = self._index(unet_number)
        steps = steps if steps is not None else self.sample_timesteps[index]
        name = sampler or self.samplers[index] or ("ddpm" if steps is None else "ddim")
        return name, steps

    def _sample_unet(
        self,
        index: int,
        shape: Tuple[int, ...],
        *,
        cond_scale: float,
        unet_kwargs: dict,
        generator: Generators,
        device: torch.device,
        sampler: str,
        steps: Optional[int],
        progress: bool = False,
    ) -> torch.Tensor:
        unet, diffusion = self.unets[index], self.diffusions[index]
        b = shape[0]
        x_start: List[Optional[torch.Tensor]] = [None]  # the last x_0 estimate, for self-conditioning

        def denoise(x: torch.Tensor, t_now: int) -> ModelOutput:
            t = torch.full((b,), t_now, device=device, dtype=torch.long)
            self_cond = x_start[0] if unet.self_cond else None
            out = unet.forward_with_cond_scale(x, t, cond_scale=cond_scale, self_cond=self_cond, **unet_kwargs).float()
            pred, var_out = self._split_output(index, out)
            if unet.self_cond:
                x_start[0] = self._threshold(self._x_start_from_prediction(index, pred, x, t))
            if var_out is not None:  # improved DDPM eq. 15's interpolation fraction
                var_out = torch.sigmoid(var_out) if self.learned_variance_constrain_frac else (var_out + 1.0) / 2.0
            return ModelOutput(pred, var_out)

        schedule = Schedule.from_betas(
            make_beta_schedule(diffusion.beta_schedule, diffusion.num_timesteps), self._objective(index), self._threshold
        )
        calls = steps or self.num_timesteps
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=calls, desc=f"sampling U-Net {index + 1} ({sampler}, {calls} steps)", leave=False, dynamic_ncols=True)
        try:
            return run_sampler(
                sampler, denoise, schedule, randn(shape, generator, device), steps=steps, generator=generator,
                callback=None if bar is None else (lambda i, t, x: bar.update(1)), eta=self.ddim_sampling_eta,
            )
        finally:
            if bar is not None:
                bar.close()

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
        generator: Generators = None,
        seed: Union[None, int, Sequence[int]] = None,
        progress: bool = False,
        sampler: Union[None, str, Sequence[Optional[str]]] = None,
        sample_timesteps: Union[None, int, Sequence[Optional[int]]] = None,
    ) -> torch.Tensor:
        """Images in [0, 1] at the size of the last U-Net run.

        cond_scale: classifier-free guidance scale, one for all U-Nets or one per U-Net.
        image: images in [0, 1] used as the low-res input when starting at an upsampler.
        batch_size: only needed when nothing else says it (an unconditional decoder).
        generator / seed: make the sampling noise reproducible (seed builds a generator). A list of
            generators or seeds gives each sample its own: its image then depends on its seed alone,
            not on the batch it is sampled in.
        progress: show a progress bar over each U-Net's sampling steps.
        sampler / sample_timesteps: override the configured sampler and steps, one for all or one per U-Net.
        """
        start = self._index(start_at_unet_number)
        stop = self._index(stop_at_unet_number if stop_at_unet_number is not None else len(self.unets))
        if stop < start:
            raise ValueError(f"stop_at_unet_number ({stop + 1}) is before start_at_unet_number ({start + 1})")
        if start > 0 and image is None:
            raise ValueError("Decoder.sample: image (the low-res input) is required when starting at an upsampler")
        if not self.unconditional and image_embed is None:
            raise ValueError("Decoder.sample: image_embed is required unless the decoder is unconditional")
        device = next(self.parameters()).device
        if isinstance(seed, int):
            generator = torch.Generator(device=device).manual_seed(seed)
        elif seed is not None:
            generator = [torch.Generator(device=device).manual_seed(int(s)) for s in seed]
        for candidate in (image_embed, image, text_encodings):
            if candidate is not None:
                batch_size = candidate.shape[0]
                break
        if batch_size is None:
            raise ValueError("Decoder.sample: pass batch_size (no image_embed, image or text_encodings to infer it from)")
        cond_scales = _per_unet(cond_scale, len(self.unets), "cond_scale")
        chosen = [
            self.sampler_for(number, name, steps)
            for number, name, steps in zip(
                range(1, len(self.unets) + 1),
                _per_unet(sampler, len(self.unets), "sampler"),
                _per_unet(sample_timesteps, len(self.unets), "sample_timesteps"),
            )
        ]

        was_training = self.training
        self.eval()
        try:
            current = image
            for index in range(start, stop + 1):
                size = self.image_sizes[index]
                lowres_img, lowres_level = self._lowres_input(index, current, training=False, generator=generator)
                unet_kwargs = dict(
                    image_embed=None if self.unconditional else image_embed,
                    text_encodings=None if self.unconditional else text_encodings,
                    text_mask=text_mask,
                    lowres_cond_img=lowres_img,
                    lowres_noise_level=lowres_level,
                )
                x = self._sample_unet(
                    index,
                    (batch_size, self.channels, size, size),
                    cond_scale=cond_scales[index],
                    unet_kwargs=unet_kwargs,
                    generator=generator,
                    device=device,
                    sampler=chosen[index][0],
                    steps=chosen[index][1],
                    progress=progress,
                )
                current = ((x + 1) / 2).clamp(0, 1)
        finally:
            self.train(was_training)
        return current
