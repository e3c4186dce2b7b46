"""The Decoder's sampling: the cascade run U-Net by U-Net, each through `samplers.run_sampler`.

`Decoder.sample` checks the request, builds the noise source (`noise.py`), and for each U-Net from
the first asked to the last its low-res input (the previous U-Net's images, noise-augmented where
the U-Net was trained so), its conditions and inpainting inputs; `sample_unet` wraps the U-Net in
a denoiser (classifier-free guidance, self-conditioning, learned variance) and hands it to the
sampler the U-Net is configured with. `DecoderSampling` is mixed into `Decoder` and reads the
settings its constructor stores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple, Union

import torch

from ..common.per_unet import per_unet
from ..common.progress import Meter, ProgressOutput, progress_output
from .lowres import LOWRES_NOISE_TIMESTEPS, resize_image
from .noise import NoiseFn, sampling_noise
from .samplers import (
    SAMPLER_NAMES,
    Generators,
    Inpainting,
    ModelOutput,
    Schedule,
    network_calls,
    run_sampler,
    runs_reference_chain,
)

if TYPE_CHECKING:
    from .decoder import Decoder

UnetCallHook = Callable[[int], None]
"""Called with a U-Net's number before each of its evaluations while sampling; may raise to abandon sampling."""


class DecoderSampling:
    """The sampling half of `Decoder` (a mixin: `self` is the Decoder)."""

    @torch.no_grad()
    def sample(
        self: "Decoder",
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
        first = start_at_unet_number
        last = stop_at_unet_number if stop_at_unet_number is not None else len(self.unets)
        cond_scales = self._check_sample_request(
            first, last, image, image_embed, inpaint_image, inpaint_mask, cond_scale
        )
        batch_size = _batch_size(batch_size, image_embed, image, text_encodings, inpaint_image)
        samplers, steps_per_unet = self._sampler_plan(first, last, sampler, sample_timesteps)
        device = next(self.parameters()).device
        noise_fn = sampling_noise(device, generator, seed, noise)

        was_training = self.training
        self.eval()
        try:
            current = image
            if image is not None and first > 1:
                current = resize_image(image, self.image_sizes[first - 2])  # the size of the U-Net below the first
            for number in range(first, last + 1):
                index, size = number - 1, self.image_sizes[number - 1]
                x = self.sample_unet(
                    number,
                    (batch_size, self.channels, size, size),
                    cond_scale=cond_scales[index],
                    unet_kwargs=self._sampling_conditions(
                        index, current, batch_size, noise_fn, device, (image_embed, text_encodings, text_mask)
                    ),
                    noise_fn=noise_fn,
                    device=device,
                    inpainting=self._inpainting(inpaint_image, inpaint_mask, size, inpaint_resample_times),
                    progress=progress,
                    sampler=samplers[index],
                    steps=steps_per_unet[index],
                    on_unet_call=on_unet_call,
                )
                current = self.unnormalize(x)
        finally:
            self.train(was_training)
        return current

    def _sampler_plan(
        self: "Decoder",
        first: int,
        last: int,
        sampler: Union[None, str, Sequence[Optional[str]]],
        sample_timesteps: Union[None, int, Sequence[Optional[int]]],
    ) -> Tuple[list, list]:
        """The sampler and steps asked for each U-Net (None: its configured one); bad ones fail before any sampling."""
        samplers = per_unet(sampler, len(self.unets), name="Decoder: sampler")
        steps_per_unet = per_unet(sample_timesteps, len(self.unets), name="Decoder: sample_timesteps")
        for number in range(first, last + 1):
            self.sampler_for(number, samplers[number - 1], steps_per_unet[number - 1])
        return samplers, steps_per_unet

    def _check_sample_request(
        self: "Decoder",
        first: int,
        last: int,
        image: Optional[torch.Tensor],
        image_embed: Optional[torch.Tensor],
        inpaint_image: Optional[torch.Tensor],
        inpaint_mask: Optional[torch.Tensor],
        cond_scale: Union[float, Sequence[float]],
    ) -> List[float]:
        """Errors of a `sample` call found before any work; the guidance scale of every U-Net."""
        self._index(first)
        self._index(last)
        if last < first:
            raise ValueError(f"stop_at_unet_number ({last}) is before start_at_unet_number ({first})")
        if first > 1 and image is None:
            raise ValueError("Decoder.sample: image (the low-res input) is required when starting at an upsampler")
        if not self.unconditional and image_embed is None:
            raise ValueError("Decoder.sample: image_embed is required unless the decoder is unconditional")
        if (inpaint_image is None) != (inpaint_mask is None):
            raise ValueError(
                "Decoder.sample: give both inpaint_image and inpaint_mask (bool, (B, H, W)) to inpaint, or neither"
            )
        cond_scales = per_unet(cond_scale, len(self.unets), name="Decoder: cond_scale")
        if any(scale != 1 for scale in cond_scales[first - 1 : last]) and not self.can_classifier_guidance:
            raise ValueError(
                "Decoder.sample: cond_scale other than 1 needs a decoder trained with condition dropout "
                "(image_cond_drop_prob or text_cond_drop_prob above 0)"
            )
        return cond_scales

    def sampler_for(
        self: "Decoder", unet_number: int, sampler: Optional[str] = None, steps: Optional[int] = None
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

    def sample_unet(
        self: "Decoder",
        unet_number: int,
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
        """Sample the images in [-1, 1] of U-Net `unet_number` (from 1), with its sampler or the one given.

        Noise is drawn through `noise_fn`, x_T first, in the reference's order, so that replayed
        noise reproduces it.
        """
        sampler, steps = self.sampler_for(unet_number, sampler, steps)
        if inpainting is not None and not runs_reference_chain(sampler, steps):
            raise ValueError(
                f"Decoder.sample: inpainting (RePaint) runs on the ddpm or ddim chain; U-Net {unet_number} "
                f"samples with {sampler} {steps} steps"
            )
        index = unet_number - 1
        diffusion = self.diffusions[index]
        schedule = Schedule.from_betas(diffusion.betas_float64(), self._objective(index), self._threshold)
        denoise = self._denoiser(index, shape[0], cond_scale, unet_kwargs, device, on_unet_call)
        calls = network_calls(sampler, steps, self.num_timesteps)
        meter = _unet_meter(progress, f"sampling U-Net {unet_number} ({sampler}, {calls} steps)", calls)
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
                diffusion=diffusion,
                inpainting=inpainting,
            )
        finally:
            meter.close()

    def _denoiser(
        self: "Decoder",
        index: int,
        batch_size: int,
        cond_scale: float,
        unet_kwargs: dict,
        device: torch.device,
        on_unet_call: Optional[UnetCallHook],
    ) -> Callable[[torch.Tensor, int], ModelOutput]:
        """U-Net `index + 1` as a sampler's denoiser: guided, self-conditioned on its last x_0 estimate."""
        unet, diffusion = self.unets[index], self.diffusions[index]
        objective = self._objective(index)
        x_start: List[Optional[torch.Tensor]] = [None]  # the last x_0 estimate, for self-conditioning

        def denoise(x: torch.Tensor, t_now: int) -> ModelOutput:
            if on_unet_call is not None:
                on_unet_call(index + 1)
            t = torch.full((batch_size,), t_now, device=device, dtype=torch.long)
            self_cond = x_start[0] if unet.self_cond else None
            out = unet.forward_with_cond_scale(x, t, cond_scale=cond_scale, self_cond=self_cond, **unet_kwargs).float()
            pred, var_out = self._split_output(index, out)
            if unet.self_cond:
                x_start[0] = self._threshold(diffusion.predict_start(objective, x, t, pred))
            if var_out is not None:
                var_out = diffusion.variance_fraction(var_out, self.learned_variance_constrain_frac)
            return ModelOutput(pred, var_out)

        return denoise

    def _inpainting(
        self: "Decoder", image: Optional[torch.Tensor], mask: Optional[torch.Tensor], size: int, resample_times: int
    ) -> Optional[Inpainting]:
        """The inpainting inputs at a U-Net's size (None when not inpainting)."""
        if image is None or mask is None:
            return None
        if mask.ndim != 3 or mask.shape[0] != image.shape[0] or mask.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                f"Decoder.sample: inpaint_mask must be (B, H, W) matching inpaint_image {tuple(image.shape)}, "
                f"got {tuple(mask.shape)}"
            )
        image = resize_image(self.normalize(image), size)
        mask = resize_image(mask[:, None].float(), size).bool()
        return Inpainting(image=image, mask=mask, resample_times=resample_times)

    def _sampling_conditions(
        self: "Decoder",
        index: int,
        current: Optional[torch.Tensor],
        batch_size: int,
        noise_fn: NoiseFn,
        device: torch.device,
        conditions: Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]],
    ) -> dict:
        """What U-Net `index + 1` is called with while sampling: (image_embed, text_encodings, text_mask) and,
        for an upsampler, the low-res input made of `current`, the images of the U-Net below it."""
        lowres_img, lowres_level = None, None
        if index > 0:
            lowres_img, lowres_level = self._sampling_lowres(index, current, batch_size, noise_fn, device)
        return self._unet_kwargs(index, *conditions, lowres_img, lowres_level)

    def _sampling_lowres(
        self: "Decoder", index: int, current: torch.Tensor, batch_size: int, noise_fn: NoiseFn, device: torch.device
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """An upsampler's low-res input in [-1, 1] from the images below it, and its augmentation level (or None)."""
        size = self.image_sizes[index]
        lowres_img = self.unets[index].lowres_input(current, size, self.input_range)
        lowres_level = None
        conditioner = self.lowres_conditioners[index]
        if conditioner.use_noise:
            level = int(self.lowres_noise_sample_level * LOWRES_NOISE_TIMESTEPS)
            lowres_level = torch.full((batch_size,), level, device=device, dtype=torch.long)
            lowres_img = conditioner.noise_image(
                lowres_img, lowres_level, noise_fn(tuple(lowres_img.shape), device, lowres_img.dtype)
            )
        return self.normalize(lowres_img), lowres_level


def _batch_size(given: Optional[int], *inputs: Optional[torch.Tensor]) -> int:
    """The batch size of the first input given (image_embed, image, text_encodings, inpaint_image), else `given`."""
    for candidate in inputs:
        if candidate is not None:
            return candidate.shape[0]
    if given is None:
        raise ValueError("Decoder.sample: pass batch_size (no image_embed, image or text_encodings to infer it from)")
    return given


def _unet_meter(progress: Union[bool, ProgressOutput], what: str, steps: int) -> Meter:
    """The meter of one U-Net's sampling steps: inside a phase with progress of its own, so no start and
    end lines, only the periodic ones (a long chain, e.g. 1000 DDPM steps at 1024px, still shows)."""
    output = progress_output(progress) or ProgressOutput(enabled=False)
    return output.meter(what, total=steps, unit="steps", boundaries=False)
