"""Diffusion math pinned to its definitions: guidance end to end through sampling, and every beta
schedule equal to its published formula (written here independently, in numpy)."""

import math

import numpy as np
import pytest
import torch

from dalle2_decoder.models import Decoder, Unet
from dalle2_decoder.models.schedules import BETA_SCHEDULES, make_beta_schedule

from .numerics import NETWORK, check_close_to_scale, scale_of_combination

pytestmark = pytest.mark.usefixtures("compute_threads")

EMBED = 8
STEPS = 25  # a cascade's last U-Net defaults to the linear schedule, which needs more than 20 steps


def tiny_decoder(num_unets: int) -> Decoder:
    torch.manual_seed(0)
    unets = [
        Unet(
            dim=8,
            image_embed_dim=EMBED,
            cond_dim=8,
            dim_mults=(1, 2),
            num_resnet_blocks=1,
            attn_heads=2,
            attn_dim_head=4,
            init_cross_embed=False,
            init_conv_kernel_size=3,
        )
        for _ in range(num_unets)
    ]
    # no learned variance: then every output channel is an image channel, guided
    decoder = Decoder(unets, image_sizes=[8, 16][:num_unets], timesteps=STEPS, learned_variance=False)
    for unet in decoder.unets:  # a fresh U-Net's zero-initialised last layer would make cond == null
        torch.nn.init.normal_(unet.to_out.weight, std=0.3)
    return decoder


class GuidanceSpy:
    """Wraps `Unet.forward_with_cond_scale`: records each call's scale and checks that its output is
    null + scale * (cond - null) on the image channels, cond and null computed with the plain forward
    (drop prob 0 and 1), within the rounding of the U-Net run at another batch size (the guided
    forward runs cond and null as one batch) carried by the coefficients (1 - scale) and scale."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = Unet.forward_with_cond_scale
        spy = self

        def wrapped(unet, x, time, *, cond_scale=1.0, **kwargs):
            out = original(unet, x, time, cond_scale=cond_scale, **kwargs)
            cond = unet.forward(x, time, **kwargs)
            null = unet.forward(x, time, **kwargs, image_cond_drop_prob=1.0, text_cond_drop_prob=1.0)
            # the image channels are guided; learned-variance channels (if any) come from cond
            channels = unet.channels
            expected = torch.cat(
                [null[:, :channels] + cond_scale * (cond[:, :channels] - null[:, :channels]), cond[:, channels:]], dim=1
            )
            scale = scale_of_combination((1 - cond_scale, null[:, :channels]), (cond_scale, cond[:, :channels]))
            scale = max(scale, float(cond[:, channels:].abs().max()) if cond.shape[1] > channels else 0.0)
            problem = check_close_to_scale(out, expected, ulps_of_scale=NETWORK, scale=scale, what="guided")
            spy.calls.append((id(unet), float(cond_scale), problem, float((cond - null).abs().max())))
            return out

        monkeypatch.setattr(Unet, "forward_with_cond_scale", wrapped)


@pytest.mark.slow
def test_sample_guides_each_unet_with_its_own_scale(monkeypatch):
    decoder = tiny_decoder(2)
    embeds = torch.randn(2, EMBED, generator=torch.Generator().manual_seed(1))
    plain = decoder.sample(image_embed=embeds, cond_scale=[2.0, 3.5], seed=3)
    spy = GuidanceSpy(monkeypatch)
    spied = decoder.sample(image_embed=embeds, cond_scale=[2.0, 3.5], seed=3)
    torch.testing.assert_close(spied, plain, rtol=0, atol=0)  # the spy changes nothing
    first, second = id(decoder.unets[0]), id(decoder.unets[1])
    assert [scale for unet, scale, _, _ in spy.calls if unet == first] == [2.0] * STEPS
    assert [scale for unet, scale, _, _ in spy.calls if unet == second] == [3.5] * STEPS
    assert all(problem is None for _, _, problem, _ in spy.calls), [call[2] for call in spy.calls if call[2]]
    # guidance is not vacuous for the first U-Net (upsamplers, as in the reference, may not see the embedding)
    assert all(difference > 1e-3 for unet, _, _, difference in spy.calls if unet == first)
    # and the scale matters for the images
    assert not torch.allclose(decoder.sample(image_embed=embeds, cond_scale=1.0, seed=3), plain)


# --- beta schedules, from their papers -------------------------------------------------------------


def _linear_ends(T):
    return 1000 / T * 1e-4, 1000 / T * 0.02


def published_cosine(T, s=0.008):
    """Nichol & Dhariwal 2021, eq. 17: f(t) = cos^2(((t/T + s)/(1 + s)) pi/2), alpha_bar = f(t)/f(0),
    beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped at 0.999."""
    f = [math.cos(((t / T + s) / (1 + s)) * math.pi / 2) ** 2 for t in range(T + 1)]
    return np.array([min(1 - f[t] / f[t - 1], 0.999) for t in range(1, T + 1)])


def published_linear(T):
    """Ho et al. 2020: beta from 1e-4 to 0.02 in T = 1000 steps (scaled by 1000/T for other T)."""
    start, end = _linear_ends(T)
    return np.array([start + (end - start) * i / (T - 1) for i in range(T)])


def published_quadratic(T):
    start, end = _linear_ends(T)
    return np.array([(math.sqrt(start) + (math.sqrt(end) - math.sqrt(start)) * i / (T - 1)) ** 2 for i in range(T)])


def published_jsd(T):
    """Sohl-Dickstein et al. 2015: beta_t = 1 / (T - t + 1), t = 1..T (the last, 1, clipped at 0.999)."""
    return np.array([min(1 / (T - t + 1), 0.999) for t in range(1, T + 1)])


def published_sigmoid(T):
    start, end = _linear_ends(T)
    return np.array([start + (end - start) / (1 + math.exp(-(-6 + 12 * i / (T - 1)))) for i in range(T)])


PUBLISHED = {
    "cosine": published_cosine,
    "linear": published_linear,
    "quadratic": published_quadratic,
    "jsd": published_jsd,
    "sigmoid": published_sigmoid,
}


def test_every_schedule_has_a_published_formula_here():
    assert set(BETA_SCHEDULES) == set(PUBLISHED), "a new schedule needs its formula in PUBLISHED"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
@pytest.mark.parametrize("timesteps", [50, 1000])
def test_schedule_equals_its_published_formula(name, timesteps):
    ours = make_beta_schedule(name, timesteps).numpy()
    # every beta is kept in (0, 0.999] (a beta of 1 makes x_0 predictions infinite), as in improved DDPM
    # (rtol 1e-6: the reference computes the jsd schedule in float32, and so do we, for parity)
    np.testing.assert_allclose(ours, np.clip(PUBLISHED[name](timesteps), 1e-8, 0.999), rtol=1e-6, atol=1e-9)
