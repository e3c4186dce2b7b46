"""Noise schedules and the diffusion math, independent of any network."""

import math

import pytest
import torch

from dalle2_decoder.models.gaussian_diffusion import (
    GaussianDiffusion,
    ddim_timestep_pairs,
    discretized_gaussian_log_likelihood,
    extract,
    normal_kl,
)
from dalle2_decoder.models.schedules import BETA_SCHEDULES, make_beta_schedule

from .numerics import EPS32, FEW_ROUNDINGS, assert_close_to_scale

PER_VALUE = dict(rtol=FEW_ROUNDINGS * EPS32, atol=0)
"""assert_close options for values of different sizes (weights, variances per timestep), each
compared at its own scale: a few float32 roundings of each."""

SCHEDULES = ["cosine", "linear", "quadratic", "jsd", "sigmoid"]


pytestmark = pytest.mark.usefixtures("compute_threads")


def test_every_required_schedule_is_known():
    assert set(SCHEDULES) <= set(BETA_SCHEDULES)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("timesteps", [1, 25, 1000])
def test_schedule_betas_in_unit_interval_and_alphas_cumprod_strictly_decreasing(name, timesteps):
    betas = make_beta_schedule(name, timesteps)
    assert betas.shape == (timesteps,)
    assert torch.all(betas > 0) and torch.all(betas <= 1)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    assert torch.all(alphas_cumprod > 0)
    assert torch.all(alphas_cumprod[1:] < alphas_cumprod[:-1])
    assert alphas_cumprod[0] < 1
    # The float32 buffers the model uses keep the same properties.
    diffusion = GaussianDiffusion(name, timesteps)
    assert torch.all(diffusion.alphas_cumprod[1:] < diffusion.alphas_cumprod[:-1])
    assert torch.isfinite(diffusion.sqrt_recip_alphas_cumprod).all()
    assert torch.isfinite(diffusion.posterior_log_variance_clipped).all()


def test_schedules_reach_near_pure_noise_at_the_last_step():
    for name in SCHEDULES:
        alphas_cumprod = torch.cumprod(1 - make_beta_schedule(name, 1000), dim=0)
        assert alphas_cumprod[-1] < 0.05, name


@pytest.mark.parametrize("name", ["linear", "quadratic"])
def test_scaled_schedules_with_too_few_steps_are_rejected(name):
    # The reference scales the betas by 1000 / T: at T = 10 the last ones exceed 1 (NaN everywhere).
    with pytest.raises(ValueError, match="more than 20 timesteps"):
        make_beta_schedule(name, 10)
    assert make_beta_schedule(name, 21).max() < 1


def test_schedules_equal_the_reference_formulas():
    # Spot values of DALLE2-pytorch 1.15.6's schedules (the full tables are covered by the parity fixtures).
    cosine = make_beta_schedule("cosine", 1000)
    assert cosine[-1] == 0.999 and abs(float(cosine[0]) - 4.1284e-05) < 1e-9
    torch.testing.assert_close(
        make_beta_schedule("linear", 1000)[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64)
    )
    jsd = make_beta_schedule("jsd", 4)
    torch.testing.assert_close(jsd, torch.tensor([0.25, 1 / 3, 0.5, 0.999], dtype=torch.float64))


def test_unknown_schedule_names_the_known_ones():
    with pytest.raises(ValueError, match="cosine"):
        make_beta_schedule("cosin", 10)


@pytest.fixture
def diffusion():
    return GaussianDiffusion("cosine", 100)


def coefficient(diffusion, name, t):
    return extract(getattr(diffusion, name), t, 4)


def test_q_sample_and_parameterisations_invert_each_other(diffusion):
    torch.manual_seed(0)
    x0, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 50, 99])
    x_t = diffusion.q_sample(x0, t, noise)
    # Each inverse is a difference of two terms that cancel (to x_0 or eps): its rounding is a few
    # ulps of the terms, not of the result; at t = 99, x_0 = x_t / sqrt(alpha_bar) - ... with
    # 1 / sqrt(alpha_bar) ~ 160, and at t = 0 eps = (...) / sqrt(1 / alpha_bar - 1) with ~1 / 0.01.
    recip, recipm1 = (
        coefficient(diffusion, "sqrt_recip_alphas_cumprod", t),
        coefficient(diffusion, "sqrt_recipm1_alphas_cumprod", t),
    )
    scale = float((recip * x_t.abs() + recipm1 * noise.abs()).max())
    start = diffusion.predict_start_from_noise(x_t, t, noise)
    assert_close_to_scale(start, x0, ulps_of_scale=FEW_ROUNDINGS, scale=scale, what="x_0 from eps")
    per_element = (recip * x_t.abs() + x0.abs()) / recipm1  # eps's terms, per timestep
    noise_from_start = diffusion.predict_noise_from_start(x_t, t, x0)
    for index in range(len(t)):
        assert_close_to_scale(
            noise_from_start[index],
            noise[index],
            ulps_of_scale=FEW_ROUNDINGS,
            scale=float(per_element[index].max()),
            what=f"eps from x_0 at t={int(t[index])}",
        )
    v = diffusion.calculate_v(x0, t, noise)
    a, s = coefficient(diffusion, "sqrt_alphas_cumprod", t), coefficient(diffusion, "sqrt_one_minus_alphas_cumprod", t)
    scale = float((a * x_t.abs() + s * v.abs()).max())
    assert_close_to_scale(
        diffusion.predict_start_from_v(x_t, t, v), x0, ulps_of_scale=FEW_ROUNDINGS, scale=scale, what="x_0 from v"
    )


def test_posterior_mean_matches_closed_form(diffusion):
    torch.manual_seed(0)
    x0, x_t = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    t = torch.tensor([5, 60])
    mean, log_var = diffusion.q_posterior(x0, x_t, t)
    # The closed form in float64 from the float64 schedule (1 - alpha_bar from a float32 alpha_bar
    # near 1 would lose most of its digits).
    betas = make_beta_schedule("cosine", 100)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    b = betas[t].view(-1, 1, 1, 1)
    a_bar = alphas_cumprod[t].view(-1, 1, 1, 1)
    a_bar_prev = alphas_cumprod[t - 1].view(-1, 1, 1, 1)
    x0, x_t = x0.double(), x_t.double()
    expected = (a_bar_prev.sqrt() * b * x0 + (1 - b).sqrt() * (1 - a_bar_prev) * x_t) / (1 - a_bar)
    # float32 coefficients and products against float64: a few roundings of the two terms' sizes
    terms = (a_bar_prev.sqrt() * b * x0.abs() + (1 - b).sqrt() * (1 - a_bar_prev) * x_t.abs()) / (1 - a_bar)
    assert_close_to_scale(mean, expected, ulps_of_scale=FEW_ROUNDINGS, scale=float(terms.max()), what="mean")
    variance = (b * (1 - a_bar_prev) / (1 - a_bar)).expand_as(log_var)
    torch.testing.assert_close(log_var.exp().double(), variance, **PER_VALUE)  # log then exp: relative errors


def test_learned_variance_interpolates_between_posterior_and_beta(diffusion):
    t = torch.tensor([30, 30])
    v = torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1)
    log_var = diffusion.model_log_variance(v, t)
    assert log_var[0].item() == pytest.approx(diffusion.posterior_log_variance_clipped[30].item(), rel=1e-5)
    assert log_var[1].item() == pytest.approx(math.log(diffusion.betas[30].item()), rel=1e-5)
    # constrain_frac squashes (v + 1) / 2 with a sigmoid, in that order (as the reference).
    frac = torch.sigmoid(torch.tensor(1.0)).item()
    constrained = diffusion.model_log_variance(v, t, constrain_frac=True)
    expected = (
        frac * math.log(diffusion.betas[30].item()) + (1 - frac) * diffusion.posterior_log_variance_clipped[30].item()
    )
    assert constrained[1].item() == pytest.approx(expected, rel=1e-5)
    # At t = 0 the posterior variance is 0; its log is floored at log(1e-20), as the reference.
    assert diffusion.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(1e-20), rel=1e-6)


def test_kl_is_zero_for_equal_gaussians_and_positive_otherwise():
    m, lv = torch.randn(5), torch.randn(5)
    # 0.5 * (-1 + lv - lv + exp(0) + 0): terms of size 1 and |lv| that cancel
    scale = 1 + float(lv.abs().max())
    assert_close_to_scale(normal_kl(m, lv, m, lv), torch.zeros(5), ulps_of_scale=FEW_ROUNDINGS, scale=scale)
    assert torch.all(normal_kl(m, lv, m + 1, lv) > 0)


def test_discretized_likelihood_is_a_distribution_over_256_bins():
    bins = torch.linspace(-1, 1, 256)
    log_p = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, 0.1), torch.full_like(bins, math.log(0.3)))
    # 256 bin probabilities, each a difference of two CDF values <= 1 (rounded to about an ulp of 1),
    # then summed (256 more roundings): 2 x 256 ulps of 1
    assert_close_to_scale(log_p.exp().sum(), 1.0, ulps_of_scale=2 * 256, scale=1.0, what="total probability")


def test_ddim_with_exact_x0_and_eta_zero_follows_the_noise_trajectory(diffusion):
    torch.manual_seed(0)
    x0, noise = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)
    t = torch.tensor([99, 99])
    x_t = diffusion.q_sample(x0, t, noise)
    # A deterministic step stays on the same trajectory: x_{t'} = q_sample(x0, t', noise), down to t' = 0
    # (the reference's chain ends at alpha_bar_0, not at x_0 itself).
    for t_next in (40, 0):
        t_before = torch.tensor([t_next, t_next])
        out = diffusion.ddim_step(x_t, t, t_before, x0, eta=0.0, noise=torch.randn_like(x0))
        # out = sqrt(alpha_bar') x_0 + sqrt(1 - alpha_bar') eps, eps recovered from x_t and x_0 by a
        # difference of terms of size (|x_t| / sqrt(alpha_bar) + |x_0|) / sqrt(1 / alpha_bar - 1)
        eps_terms = (coefficient(diffusion, "sqrt_recip_alphas_cumprod", t) * x_t.abs() + x0.abs()) / coefficient(
            diffusion, "sqrt_recipm1_alphas_cumprod", t
        )
        a, s = (
            coefficient(diffusion, name, t_before) for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
        )
        scale = float((a * x0.abs() + s * eps_terms).max())
        expected = diffusion.q_sample(x0, t_before, noise)
        assert_close_to_scale(out, expected, ulps_of_scale=FEW_ROUNDINGS, scale=scale, what=f"to t={t_next}")
    # eta = 0 adds no noise; eta = 1 does, unless no noise is given (the last step).
    t_before = torch.tensor([40, 40])
    a = diffusion.ddim_step(x_t, t, t_before, x0, eta=1.0, noise=torch.randn_like(x0))
    b = diffusion.ddim_step(x_t, t, t_before, x0, eta=1.0, noise=None)
    assert not torch.allclose(a, b)


def test_q_sample_from_to_moves_along_the_same_noise(diffusion):
    x0, noise = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)
    lo, hi = torch.tensor([10, 10]), torch.tensor([60, 60])
    x_lo = diffusion.q_sample(x0, lo, noise)
    # Given the noise already in the sample, it lands on the same trajectory at the later step.
    # (x_lo a_hi / a_lo + noise (s_hi a_lo - s_lo a_hi) / a_lo: a few roundings of its terms' sizes)
    a_lo, a_hi = diffusion.sqrt_alphas_cumprod[10], diffusion.sqrt_alphas_cumprod[60]
    s_lo, s_hi = diffusion.sqrt_one_minus_alphas_cumprod[10], diffusion.sqrt_one_minus_alphas_cumprod[60]
    scale = float((x_lo.abs() * a_hi / a_lo + noise.abs() * (s_hi + s_lo * a_hi / a_lo)).max())
    moved = diffusion.q_sample_from_to(x_lo, lo, hi, noise)
    expected = diffusion.q_sample(x0, hi, noise)
    assert_close_to_scale(moved, expected, ulps_of_scale=FEW_ROUNDINGS, scale=scale, what="moved")
    # With no noise it is the x_0-scaled sample alone.
    alone = diffusion.q_sample_from_to(x_lo, lo, hi, torch.zeros_like(x0))
    assert_close_to_scale(alone, x_lo * a_hi / a_lo, ulps_of_scale=FEW_ROUNDINGS, what="without noise")


def test_ddpm_step_adds_no_noise_at_t0(diffusion):
    x0, x_t = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    t = torch.tensor([0])
    a = diffusion.ddpm_step(x_t, t, x0, None, torch.randn(1, 1, 2, 2))
    b = diffusion.ddpm_step(x_t, t, x0, None, torch.randn(1, 1, 2, 2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the noise is not used at all


def test_ddim_timestep_pairs_are_the_references():
    # DALLE2-pytorch: steps + 1 points evenly over [0, T), rounded down, walked down to 0.
    assert ddim_timestep_pairs(1000, 4) == [(800, 600), (600, 400), (400, 200), (200, 0)]
    assert ddim_timestep_pairs(8, 3) == [(6, 4), (4, 2), (2, 0)]
    pairs = ddim_timestep_pairs(10, 10)  # repeated points are skipped
    assert all(t > t_next for t, t_next in pairs) and pairs[-1][1] == 0
    assert all(a[1] == b[0] for a, b in zip(pairs, pairs[1:]))


def test_loss_weights(diffusion):
    t = torch.tensor([0, 50, 99])
    snr = diffusion.snr[t]
    torch.testing.assert_close(diffusion.p2_loss_weight(t, 1.0, 1.0), 1 / (1 + snr), **PER_VALUE)
    eps_w = diffusion.min_snr_loss_weight(t, 5.0, "eps")
    torch.testing.assert_close(eps_w, snr.clamp(max=5) / snr, **PER_VALUE)
    assert eps_w[0] < 1 and eps_w[-1] == 1  # high-SNR (early) steps are down-weighted, noisy ones untouched
    torch.testing.assert_close(diffusion.min_snr_loss_weight(t, 5.0, "v"), snr.clamp(max=5) / (snr + 1), **PER_VALUE)
