"""Gaussian diffusion math, independent of any network.

`GaussianDiffusion` holds the per-step constants of one noise schedule as buffers and offers
the forward process, the posterior, conversions between the eps / x_0 / v parameterisations,
the variational-bound terms of improved DDPM, loss weights, and single DDPM / DDIM steps (the
reference's chains in `samplers.reference` walk them).
All functions take a batch of integer timesteps `t` (B,) and never synchronise with the host.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .samplers.base import ddim_timestep_pairs  # noqa: F401 (the reference's DDIM points, also offered here)
from .schedules import make_beta_schedule


def extract(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] reshaped to (B, 1, ..., 1) so that it broadcasts against an ndim-d batch."""
    return values.gather(0, t).reshape(t.shape[0], *([1] * (ndim - 1)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation of Phi used by improved DDPM; it is smooth and cheap on every device.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) for x in [-1, 1] quantised to 256 bins under N(mean, e^(2 log_scale)) (DDPM eq. 13)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # The edge bins integrate to -inf / +inf so that the likelihood sums to one over all 256 bins.
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion(nn.Module):
    """The constants of one discrete-time diffusion process with `timesteps` steps.

    Buffers are non-persistent: they are a pure function of (beta_schedule, timesteps), so
    checkpoints carry only network weights and a schedule can be changed without surgery.
    """

    def __init__(self, beta_schedule: str = "cosine", timesteps: int = 1000, shift: float = 1.0):
        super().__init__()
        self.beta_schedule = beta_schedule
        self.num_timesteps = timesteps
        self.shift = shift
        # Constants, computed on the CPU whatever device context the model is built under (e.g. the meta
        # device, which cannot be read back, when the pre-flight check sizes a checkpoint).
        with torch.device("cpu"):
            betas = self.betas_float64()  # float64 for the derived constants
            alphas = 1.0 - betas
            alphas_cumprod = torch.cumprod(alphas, dim=0)
            alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
            # DDPM eq. 7: variance of q(x_{t-1} | x_t, x_0).
            posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)

        def register(name: str, value: torch.Tensor) -> None:
            self.register_buffer(name, value.to(torch.float32), persistent=False)

        register("betas", betas)
        register("alphas_cumprod", alphas_cumprod)
        register("alphas_cumprod_prev", alphas_cumprod_prev)
        register("sqrt_alphas_cumprod", alphas_cumprod.sqrt())
        register("sqrt_one_minus_alphas_cumprod", (1.0 - alphas_cumprod).sqrt())
        register("sqrt_recip_alphas_cumprod", (1.0 / alphas_cumprod).sqrt())
        register("sqrt_recipm1_alphas_cumprod", (1.0 / alphas_cumprod - 1.0).sqrt())
        register("posterior_variance", posterior_variance)
        # The posterior variance is 0 at t = 0; a floor of 1e-20 keeps its log finite (DALLE2-pytorch's
        # choice, so that learned-variance outputs and VB terms at t = 0 equal the reference's).
        register("posterior_log_variance_clipped", torch.log(posterior_variance.clamp(min=1e-20)))
        register("log_betas", torch.log(betas))
        # DDPM eq. 7: posterior mean = coef1 * x_0 + coef2 * x_t.
        register("posterior_mean_coef1", betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod))
        register("posterior_mean_coef2", (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod))
        register("snr", alphas_cumprod / (1.0 - alphas_cumprod))

    # ----------------------------------------------------------------- forward process
    def betas_float64(self) -> torch.Tensor:
        """The schedule's betas in float64 (the buffers hold float32), for samplers that derive their own constants."""
        return make_beta_schedule(self.beta_schedule, self.num_timesteps, self.shift)

    def sample_timesteps(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Uniform random training timesteps in [0, T)."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, dtype=torch.long)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """DDPM eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise
        )

    def q_sample_from_to(
        self, x_from: torch.Tensor, from_t: torch.Tensor, to_t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Move a sample of q(x_from_t | x_0) to one of q(x_to_t | x_0) with the same x_0 estimate.

        With a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar):
        x_to = x_from a_to / a_from + noise (s_to a_from - s_from a_to) / a_from,
        DALLE2-pytorch's re-noising step of RePaint-style inpainting (Lugmayr et al. 2022).
        """
        a_from = extract(self.sqrt_alphas_cumprod, from_t, x_from.ndim)
        s_from = extract(self.sqrt_one_minus_alphas_cumprod, from_t, x_from.ndim)
        a_to = extract(self.sqrt_alphas_cumprod, to_t, x_from.ndim)
        s_to = extract(self.sqrt_one_minus_alphas_cumprod, to_t, x_from.ndim)
        return x_from * (a_to / a_from) + noise * (s_to * a_from - s_from * a_to) / a_from

    def q_posterior(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7)."""
        mean = (
            extract(self.posterior_mean_coef1, t, x_t.ndim) * x_start
            + extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t
        )
        return mean, extract(self.posterior_log_variance_clipped, t, x_t.ndim)

    # ----------------------------------------------------------------- parameterisations
    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Invert eq. 4: x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * noise
        )

    def predict_noise_from_start(self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor) -> torch.Tensor:
        """eps = (x_t / sqrt(alpha_bar) - x_0) / sqrt(1 / alpha_bar - 1)."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x_start) / extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim
        )

    def calculate_v(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Salimans & Ho 2022 (progressive distillation) sec. 4: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * noise
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * x_start
        )

    def predict_start_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v
        )

    def predict_start(
        self, objective: str, x_t: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor
    ) -> torch.Tensor:
        """The (unclamped) x_0 estimate of a network that predicts `objective` (eps, x0 or v)."""
        if objective == "v":
            return self.predict_start_from_v(x_t, t, prediction)
        if objective == "x0":
            return prediction
        return self.predict_start_from_noise(x_t, t, prediction)

    @staticmethod
    def variance_fraction(var_output: torch.Tensor, constrain_frac: bool = False) -> torch.Tensor:
        """Improved DDPM eq. 15's v = (output + 1) / 2; constrain_frac squashes it with a sigmoid after that
        mapping (DALLE2-pytorch's learned_variance_constrain_frac, applied in the same order)."""
        frac = (var_output + 1.0) / 2.0
        return torch.sigmoid(frac) if constrain_frac else frac

    def log_variance_from_fraction(self, frac: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Improved DDPM eq. 15: log Sigma = v log beta_t + (1 - v) log beta~_t."""
        min_log = extract(self.posterior_log_variance_clipped, t, frac.ndim)
        max_log = extract(self.log_betas, t, frac.ndim)
        return frac * max_log + (1.0 - frac) * min_log

    def model_log_variance(
        self, var_output: torch.Tensor, t: torch.Tensor, constrain_frac: bool = False
    ) -> torch.Tensor:
        """The learned log-variance of a network's variance output (see `variance_fraction`)."""
        return self.log_variance_from_fraction(self.variance_fraction(var_output, constrain_frac), t)

    # ----------------------------------------------------------------- losses
    def vb_terms_bpd(
        self,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        model_mean: torch.Tensor,
        model_log_variance: torch.Tensor,
    ) -> torch.Tensor:
        """Per-sample L_t of the variational bound in bits per dimension (improved DDPM eq. 4-6).

        L_0 is the discretised decoder likelihood, L_{t>0} the KL to the true posterior.
        """
        true_mean, true_log_variance = self.q_posterior(x_start, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, model_mean, model_log_variance).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_variance).flatten(1).mean(
            1
        ) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def p2_loss_weight(self, t: torch.Tensor, gamma: float, k: float) -> torch.Tensor:
        """Choi et al. 2022 (perception prioritized training) eq. 8: lambda_t = 1 / (k + SNR(t))^gamma."""
        return (k + self.snr.gather(0, t)) ** -gamma

    def min_snr_loss_weight(self, t: torch.Tensor, gamma: float, objective: str) -> torch.Tensor:
        """Hang et al. 2023 (Min-SNR), eq. 8 and its eps / v forms: min(SNR, gamma) relative to the target's weight."""
        snr = self.snr.gather(0, t)
        clipped = snr.clamp(max=gamma)
        if objective == "eps":
            return clipped / snr
        if objective == "v":
            return clipped / (snr + 1.0)
        return clipped  # x_0 objective

    # ----------------------------------------------------------------- sampling steps
    def ddpm_step(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        x_start: torch.Tensor,
        model_log_variance: Optional[torch.Tensor],
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """Ancestral step x_t -> x_{t-1} from a predicted x_0 (DDPM Algorithm 2, posterior form)."""
        mean, posterior_log_variance = self.q_posterior(x_start, x_t, t)
        log_variance = posterior_log_variance if model_log_variance is None else model_log_variance
        # No noise is added on the final step (t == 0): the mean is the sample.
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return mean + nonzero * torch.exp(0.5 * log_variance) * noise

    def ddim_step(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        t_next: torch.Tensor,
        x_start: torch.Tensor,
        eta: float,
        noise: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """DDIM (Song et al. 2021) eq. 12 from step t to the earlier step t_next (both in [0, T)).

        sigma follows eq. 16 (eta = 0: deterministic DDIM, eta = 1: DDPM-like). `noise` None adds
        none (the reference's last step, t_next = 0). As in DALLE2-pytorch, the chain ends at
        alpha_bar_0, not at 1, so the result is sqrt(alpha_bar_0) x_0 plus a small noise direction.
        """
        eps = self.predict_noise_from_start(x_t, t, x_start)
        alpha = extract(self.alphas_cumprod, t, x_t.ndim)
        alpha_next = extract(self.alphas_cumprod, t_next, x_t.ndim)
        c1 = eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt()
        c2 = ((1 - alpha_next) - c1**2).sqrt()
        out = x_start * alpha_next.sqrt() + c2 * eps
        return out if noise is None else out + c1 * noise
