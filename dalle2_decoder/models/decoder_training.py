"""The Decoder's training loss: `decoder(image, image_embed=..., unet_number=n)`.

One U-Net's loss on a batch: the low-res conditioning and random crop of the upsamplers, the
forward process, self-conditioning, the objective's target with its weights (P2, Min-SNR) and,
for learned-variance U-Nets, improved DDPM's variational-bound term. `DecoderTraining` is mixed
into `Decoder` and reads the settings its constructor stores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .lowres import resize_image

if TYPE_CHECKING:
    from .decoder import Decoder


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


class DecoderTraining:
    """The training half of `Decoder` (a mixin: `self` is the Decoder)."""

    def forward(
        self: "Decoder",
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
        self._check_training_batch(index, image, image_embed)
        unet, diffusion = self.unets[index], self.diffusions[index]

        # Draw order equals the reference's: timesteps, then the low-res augmentation, then the noise.
        times = draws.times if draws.times is not None else diffusion.sample_timesteps(image.shape[0], image.device)
        x_start, lowres_img, lowres_level = self._training_images(index, image, draws)
        noise = draws.noise if draws.noise is not None else torch.randn_like(x_start)
        x_t = diffusion.q_sample(x_start, times, noise)
        unet_kwargs = self._unet_kwargs(index, image_embed, text_encodings, text_mask, lowres_img, lowres_level)
        self_cond = self._self_condition(index, x_t, times, unet_kwargs, draws)

        out = unet(
            x_t,
            times,
            self_cond=self_cond,
            image_cond_drop_prob=self.image_cond_drop_prob,
            text_cond_drop_prob=self.text_cond_drop_prob,
            **unet_kwargs,
        ).float()  # losses in fp32 under autocast
        pred, var_out = self._split_output(index, out)
        loss = self._prediction_loss(index, pred, x_start, noise, times)
        if var_out is not None:
            loss = loss + self.vb_loss_weight * self._vb_loss(index, pred, var_out, x_start, x_t, times)
        return loss

    def _check_training_batch(self: "Decoder", index: int, image: torch.Tensor, image_embed: Optional[torch.Tensor]):
        size = self.image_sizes[index]
        _, c, h, w = image.shape
        if c != self.channels:
            raise ValueError(f"Decoder: images have {c} channels, the decoder was built for {self.channels}")
        if h < size or w < size:
            raise ValueError(f"Decoder: images of {h}x{w} are smaller than U-Net {index + 1}'s size {size}")
        if self.image_conditioned[index] and image_embed is None:
            raise ValueError("Decoder: image_embed is required unless the decoder is unconditional")

    def _training_images(
        self: "Decoder", index: int, image: torch.Tensor, draws: TrainingDraws
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(x_0 in [-1, 1], the upsampler's low-res input in [-1, 1] or None, its noise level or None)."""
        size = self.image_sizes[index]
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
        return self.normalize(target_image), None if lowres_img is None else self.normalize(lowres_img), lowres_level

    def _self_condition(
        self: "Decoder", index: int, x_t: torch.Tensor, times: torch.Tensor, unet_kwargs: dict, draws: TrainingDraws
    ) -> Optional[torch.Tensor]:
        """Self-conditioning (Chen et al. 2022, Analog Bits, sec. 3.2): sometimes first estimate without
        gradients (and without condition dropout) and feed the estimate back; None when not this time."""
        unet = self.unets[index]
        if not unet.self_cond:
            return None
        if self.self_cond_x_start:
            with torch.no_grad():
                first, _ = self._split_output(index, unet(x_t, times, **unet_kwargs).float())
                estimate = self.diffusions[index].predict_start(self._objective(index), x_t, times, first).clamp(-1, 1)
            use = (torch.rand(x_t.shape[0], device=x_t.device) < self.self_cond_prob)[:, None, None, None]
            return torch.where(use, estimate, torch.zeros_like(estimate))
        # One draw per batch, as the reference (from torch's CPU generator, see LowresConditioner.draw_blur).
        use = draws.self_cond if draws.self_cond is not None else float(torch.rand(())) < self.self_cond_prob
        if not use:
            return None
        with torch.no_grad():
            first, _ = self._split_output(index, unet(x_t, times, **unet_kwargs))
            return first.detach()

    def _prediction_loss(
        self: "Decoder", index: int, pred: torch.Tensor, x_start: torch.Tensor, noise: torch.Tensor, times: torch.Tensor
    ) -> torch.Tensor:
        """The loss of the prediction against the objective's target, weighted per sample, averaged."""
        diffusion, objective = self.diffusions[index], self._objective(index)
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
        return loss.mean()

    def _vb_loss(
        self: "Decoder",
        index: int,
        pred: torch.Tensor,
        var_out: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        times: torch.Tensor,
    ) -> torch.Tensor:
        """L_vlb of improved DDPM (sec. 3.1), which trains only the variance: the mean gets a stop-gradient.

        As in the reference, the mean comes from the unclamped x_0, read from the prediction as noise
        whatever the objective, unless vb_mean_from_objective.
        """
        diffusion = self.diffusions[index]
        vb_objective = self._objective(index) if self.vb_mean_from_objective else "eps"
        x_start_pred = diffusion.predict_start(vb_objective, x_t, times, pred)
        model_mean, _ = diffusion.q_posterior(x_start_pred, x_t, times)
        model_log_variance = diffusion.model_log_variance(var_out, times, self.learned_variance_constrain_frac)
        vb = diffusion.vb_terms_bpd(x_start, x_t, times, model_mean.detach(), model_log_variance).mean()
        if self.vb_loss_scale_timesteps:
            # L_vlb = sum_t L_t is estimated by T * L_t at the sampled t (improved DDPM eq. 16).
            vb = vb * self.num_timesteps
        return vb

    def _elementwise_loss(self: "Decoder", pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
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
