"""Properties of the low-resolution conditioning's augmentations: the blur kernel and the noise.

The rules are DALLE2-pytorch 1.15.6's `LowresConditioner` (docs/MODEL.md, models/lowres.py): a
Gaussian blur with kornia's kernel (exp(-x^2 / (2 sigma^2)) over kernel_size taps centred on the
middle one, normalised to sum 1, reflect padding), sigma drawn uniformly from its range and the
kernel size uniformly from its inclusive integer range, an even size replaced by the next odd
one; and Imagen's noise augmentation, q_sample on a fixed 1000-step linear schedule at a level
drawn uniformly from 0..999. Expected values are computed here with `math`.
"""

from __future__ import annotations

import math
from typing import List

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dalle2_decoder.models.lowres import LOWRES_NOISE_TIMESTEPS, LowresConditioner, gaussian_blur

pytestmark = pytest.mark.usefixtures("compute_threads")

FLOAT32_EPS = 2.0**-23


def kornia_kernel(sigma: float, size: int) -> List[float]:
    taps = [math.exp(-((i - size // 2) ** 2) / (2 * sigma**2)) for i in range(size)]
    return [tap / sum(taps) for tap in taps]


@settings(max_examples=40)
@given(
    sigma=st.floats(0.1, 4.0),
    half=st.integers(0, 4),
    height=st.integers(11, 16),
    width=st.integers(11, 16),
    row=st.integers(0, 100),
    column=st.integers(0, 100),
)
def test_blur_spreads_a_point_by_the_separable_gaussian_kernel(sigma, half, height, width, row, column):
    """The blur of one bright pixel (beyond the kernel's reach of the borders, so reflect padding
    mirrors nothing of it) is the outer product of the normalised
    1-D Gaussian kernel exp(-(i - r)^2 / (2 sigma^2)), i = 0 .. 2r, centred on the pixel; a flat
    image stays flat (the kernel sums to 1, reflect padding adds nothing new)."""
    size = 2 * half + 1
    row = half + 1 + row % (height - 2 - 2 * half)
    column = half + 1 + column % (width - 2 - 2 * half)
    image = torch.zeros(1, 1, height, width)
    image[0, 0, row, column] = 1.0
    out = gaussian_blur(image, sigma, size)
    kernel = kornia_kernel(sigma, size)
    expected = torch.zeros(height, width, dtype=torch.float64)
    taps = torch.tensor(kernel, dtype=torch.float64)
    expected[row - half : row + half + 1, column - half : column + half + 1] = torch.outer(taps, taps)
    torch.testing.assert_close(out[0, 0].double(), expected, rtol=0, atol=8 * FLOAT32_EPS)
    flat = torch.full((2, 3, height, width), 0.37)
    torch.testing.assert_close(gaussian_blur(flat, sigma, size), flat, rtol=0, atol=8 * FLOAT32_EPS)


@settings(max_examples=30)
@given(
    low_size=st.integers(1, 6),
    extra_size=st.integers(0, 4),
    low_sigma=st.floats(0.1, 2.0),
    extra_sigma=st.floats(0.0, 2.0),
    probability=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 1000),
)
def test_blur_draws_cover_the_configured_ranges(low_size, extra_size, low_sigma, extra_sigma, probability, seed):
    """Each batch is blurred with probability `blur_prob`; its sigma is drawn uniformly from
    [low, high] and its kernel size uniformly from low .. high, both ends included: over 1000 draws
    every size of the range comes up, no value falls outside, and the share of blurred batches is
    within 5 standard deviations of `blur_prob`."""
    sizes = (low_size, low_size + extra_size)
    sigmas = (low_sigma, low_sigma + extra_sigma)
    conditioner = LowresConditioner(blur_prob=probability, blur_sigma=sigmas, blur_kernel_size=sizes)
    torch.manual_seed(seed)
    draws = [conditioner.draw_blur() for _ in range(1000)]
    blurred = [(sigma, size) for do, sigma, size in draws if do]
    spread = 5 * math.sqrt(probability * (1 - probability) / len(draws))
    assert abs(len(blurred) / len(draws) - probability) <= spread + 1e-12
    assert all(sigmas[0] <= sigma <= sigmas[1] for sigma, _ in blurred)
    if blurred:
        assert {size for _, size in blurred} <= set(range(sizes[0], sizes[1] + 1))
    if len(blurred) >= 60 * (extra_size + 1):  # each size then comes up with near certainty
        assert {size for _, size in blurred} == set(range(sizes[0], sizes[1] + 1))


@settings(max_examples=20)
@given(half=st.integers(1, 3), sigma=st.floats(0.3, 2.0), seed=st.integers(0, 100))
def test_an_even_kernel_size_blurs_with_the_next_odd_one(half, sigma, seed):
    """The reference (kornia) refuses even kernel sizes; an even size 2k is blurred with 2k + 1,
    the next odd one (models/lowres.py), never with a smaller kernel."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, 16, 16, generator=generator)
    conditioner = LowresConditioner(blur_prob=1.0)
    even, _ = conditioner(image, target_size=16, downsample_size=16, blur=(True, sigma, 2 * half))
    odd = gaussian_blur(image, sigma, 2 * half + 1)
    torch.testing.assert_close(even, odd, rtol=0, atol=0)


def linear_alpha_bars() -> List[float]:
    """The augmentation's fixed schedule: DDPM's linear betas 1e-4 .. 0.02 over 1000 steps, cumulated."""
    values, running = [], 1.0
    for i in range(LOWRES_NOISE_TIMESTEPS):
        running *= 1.0 - (1e-4 + (0.02 - 1e-4) * i / (LOWRES_NOISE_TIMESTEPS - 1))
        values.append(running)
    return values


@settings(max_examples=30)
@given(
    levels=st.lists(st.integers(0, LOWRES_NOISE_TIMESTEPS - 1), min_size=1, max_size=4),
    unit_range=st.booleans(),
    seed=st.integers(0, 100),
)
def test_noise_augmentation_is_q_sample_on_the_fixed_linear_schedule(levels, unit_range, seed):
    """At level t the low-res input becomes sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) noise in
    [-1, 1] space (images in [0, 1] are mapped there and back), alpha_bar of the fixed
    1000-step linear schedule whatever the decoder's own number of timesteps."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(levels)
    image = torch.rand(batch, 3, 8, 8, generator=generator, dtype=torch.float64)
    if not unit_range:
        image = image * 2 - 1
    noise = torch.randn(batch, 3, 8, 8, generator=generator, dtype=torch.float64)
    conditioner = LowresConditioner(
        use_blur=False, use_noise=True, input_range=(0.0, 1.0) if unit_range else (-1.0, 1.0)
    )
    out, level = conditioner(image, target_size=8, downsample_size=8, noise_level=torch.tensor(levels), noise=noise)
    assert level.tolist() == levels
    bars = linear_alpha_bars()
    for row, t in enumerate(levels):
        x = image[row] * 2 - 1 if unit_range else image[row]
        noised = math.sqrt(bars[t]) * x + math.sqrt(1 - bars[t]) * noise[row]
        want = (noised + 1) / 2 if unit_range else noised
        # the schedule's constants are float32 buffers (as the reference's)
        torch.testing.assert_close(out[row], want, rtol=0, atol=16 * FLOAT32_EPS * (1 + noise[row].abs().max()))


@settings(max_examples=10)
@given(seed=st.integers(0, 1000))
def test_noise_levels_are_drawn_uniformly_from_0_to_999(seed):
    """Without fixed draws, each sample's noise level is uniform on 0 .. 999 (both ends included):
    over 20000 samples both ends come up and the mean is within 5 standard deviations of 499.5."""
    torch.manual_seed(seed)
    conditioner = LowresConditioner(use_blur=False, use_noise=True)
    _, levels = conditioner(torch.rand(20000, 1, 1, 1), target_size=1, downsample_size=1)
    assert int(levels.min()) == 0 and int(levels.max()) == LOWRES_NOISE_TIMESTEPS - 1
    spread = 5 * math.sqrt((LOWRES_NOISE_TIMESTEPS**2 - 1) / 12 / levels.numel())
    assert abs(levels.double().mean().item() - (LOWRES_NOISE_TIMESTEPS - 1) / 2) <= spread
