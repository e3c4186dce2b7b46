"""The Decoder: losses, learned variance, the cascade, low-res conditioning, sampling, training."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from dalle2_decoder.models import Decoder, Unet
from dalle2_decoder.models.decoder import ReplayedNoise, TrainingDraws
from dalle2_decoder.models.lowres import LowresConditioner, gaussian_blur

from .conftest import TINY_UNET_OPTIONS
from .numerics import FEW_ROUNDINGS, NETWORK, assert_close_to_scale, scale_of_combination

EMBED = 12  # not cond_dim: the reference (and so our U-Net) skips the image projection when they are equal


pytestmark = pytest.mark.usefixtures("compute_threads")


def tiny_unet(**overrides) -> Unet:
    kwargs = dict(
        dim=8,
        image_embed_dim=EMBED,
        dim_mults=(1, 2),
        **TINY_UNET_OPTIONS,
    )
    kwargs.update(overrides)
    return Unet(**kwargs)


def tiny_decoder(num_unets=1, unet_overrides=None, **overrides) -> Decoder:
    # cosine throughout: the reference's default linear schedule for the last U-Net needs over 20 steps.
    kwargs = dict(image_sizes=[8, 16][:num_unets], timesteps=20, beta_schedule="cosine")
    kwargs.update(overrides)
    return Decoder([tiny_unet(**(unet_overrides or {})) for _ in range(num_unets)], **kwargs)


def batch(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randn(n, EMBED, generator=g)


def randomise_outputs(decoder: Decoder) -> Decoder:
    torch.manual_seed(1)
    for unet in decoder.unets:
        torch.nn.init.normal_(unet.to_out.weight, std=0.3)
    return decoder


# -------------------------------------------------------------------- losses
@pytest.mark.parametrize("loss_type, loss_fn", [("l1", F.l1_loss), ("l2", F.mse_loss), ("huber", F.smooth_l1_loss)])
@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_each_loss_type_and_objective_matches_a_manual_computation(loss_type, loss_fn, objective):
    decoder = randomise_outputs(
        tiny_decoder(
            loss_type=loss_type,
            learned_variance=False,
            image_cond_drop_prob=0.0,
            predict_x_start=objective == "x0",
            predict_v=objective == "v",
        )
    )
    images, embeds = batch(size=8)
    torch.manual_seed(5)
    loss = decoder(images, image_embed=embeds)
    assert loss.ndim == 0 and torch.isfinite(loss)

    # The same draws, by hand: timesteps, then noise (no conditioning dropout at probability 0).
    diffusion, unet = decoder.diffusions[0], decoder.unets[0]
    torch.manual_seed(5)
    t = torch.randint(0, 20, (4,))
    x0 = images * 2 - 1
    noise = torch.randn_like(x0)
    pred = unet(diffusion.q_sample(x0, t, noise), t, image_embed=embeds)
    target = {"eps": noise, "x0": x0, "v": diffusion.calculate_v(x0, t, noise)}[objective]
    # (the same U-Net and loss reached by another path: their arithmetic may be ordered differently)
    assert_close_to_scale(loss, loss_fn(pred, target), ulps_of_scale=NETWORK, what="loss")


def test_unknown_loss_type_is_rejected():
    with pytest.raises(ValueError, match="huber"):
        tiny_decoder(loss_type="l3")


@pytest.mark.parametrize("weighting", [dict(p2_loss_weight_gamma=1.0), dict(min_snr_loss_weight=True)])
def test_loss_weighting_scales_each_sample(weighting):
    plain = randomise_outputs(tiny_decoder(learned_variance=False, image_cond_drop_prob=0.0))
    weighted = tiny_decoder(learned_variance=False, image_cond_drop_prob=0.0, **weighting)
    weighted.load_state_dict(plain.state_dict())
    images, embeds = batch(size=8)
    torch.manual_seed(5)
    t = torch.randint(0, 20, (4,))
    diffusion = plain.diffusions[0]
    w = (
        diffusion.p2_loss_weight(t, 1.0, 1.0)
        if "p2_loss_weight_gamma" in weighting
        else diffusion.min_snr_loss_weight(t, 5.0, "eps")
    )
    per_sample = []
    for i in range(4):  # one sample at a time with the same timestep and noise draws
        torch.manual_seed(5)
        torch.randint(0, 20, (4,))
        noise = torch.randn(4, 3, 8, 8)[i : i + 1]
        x_t = diffusion.q_sample(images[i : i + 1] * 2 - 1, t[i : i + 1], noise)
        per_sample.append(F.mse_loss(plain.unets[0](x_t, t[i : i + 1], image_embed=embeds[i : i + 1]), noise))
    torch.manual_seed(5)
    expected = (torch.stack(per_sample) * w).mean()
    # the U-Net at batch size 1 against 4: its arithmetic blocked differently
    assert_close_to_scale(weighted(images, image_embed=embeds), expected, ulps_of_scale=NETWORK, what="weighted loss")


def test_learned_variance_loss_is_finite_and_trains_the_variance_channels():
    decoder = tiny_decoder(learned_variance=True, timesteps=50)
    assert decoder.unets[0].channels_out == 6
    images, embeds = batch(size=8)
    for seed in range(3):  # includes t == 0 (decoder NLL) and t > 0 (KL) terms across draws
        torch.manual_seed(seed)
        loss = decoder(images, image_embed=embeds)
        assert torch.isfinite(loss)
        decoder.zero_grad()
        loss.backward()
        weight_grad = decoder.unets[0].to_out.weight.grad
        assert weight_grad[3:].abs().sum() > 0  # variance channels
        assert weight_grad[:3].abs().sum() > 0  # mean channels


def test_variational_term_does_not_move_the_mean(monkeypatch):
    # With the simple loss zeroed (VB term only), the mean channels get no gradient: the stop-gradient of improved DDPM.
    decoder = randomise_outputs(tiny_decoder(learned_variance=True, vb_loss_weight=1.0))
    images, embeds = batch(size=8)
    torch.manual_seed(0)
    full = decoder(images, image_embed=embeds)
    simple = decoder._elementwise_loss
    monkeypatch.setattr(decoder, "_elementwise_loss", lambda pred, target: simple(pred, target) * 0.0)
    torch.manual_seed(0)
    vb_only = decoder(images, image_embed=embeds)
    decoder.zero_grad()
    vb_only.backward()
    grad = decoder.unets[0].to_out.weight.grad
    assert grad[:3].abs().sum() == 0 and grad[3:].abs().sum() > 0
    assert 0 < vb_only < full


def _fixed_draws(size=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    return TrainingDraws(times=torch.tensor([0, 4, 9, 19]), noise=torch.randn(4, 3, size, size, generator=g))


def test_vb_term_is_unscaled_by_default_and_scaled_by_timesteps_as_an_option():
    images, embeds = batch(size=8)
    losses = {}
    for name, options in {
        "simple": dict(vb_loss_weight=0.0),
        "reference": {},
        "scaled": dict(vb_loss_scale_timesteps=True),
    }.items():
        torch.manual_seed(0)
        decoder = randomise_outputs(tiny_decoder(learned_variance=True, **options))
        losses[name] = decoder(images, image_embed=embeds, draws=_fixed_draws()).item()
    reference_vb = losses["reference"] - losses["simple"]
    assert reference_vb > 0
    # The U-Net outputs are the same; each loss rounds a few times at its own size, and the
    # differences carry those errors: (scaled - simple) - 20 * (reference - simple).
    scale = scale_of_combination((1, losses["scaled"]), (21, losses["simple"]), (20, losses["reference"]))
    assert_close_to_scale(
        losses["scaled"] - losses["simple"], 20 * reference_vb, ulps_of_scale=FEW_ROUNDINGS, scale=scale, what="vb"
    )


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_vb_mean_reads_the_prediction_as_noise_unless_asked(objective):
    images, embeds = batch(size=8)
    losses = []
    for option in (False, True):
        torch.manual_seed(0)
        decoder = randomise_outputs(
            tiny_decoder(
                learned_variance=True,
                vb_loss_weight=1.0,
                vb_mean_from_objective=option,
                predict_x_start=objective == "x0",
                predict_v=objective == "v",
            )
        )
        losses.append(decoder(images, image_embed=embeds, draws=_fixed_draws()).item())
    # The reference reads the prediction as noise in L_vlb; only x_0 / v objectives see a difference.
    assert (losses[0] == pytest.approx(losses[1], rel=1e-6)) == (objective == "eps")


def test_self_conditioning_draw_and_our_per_sample_variant():
    images, embeds = batch(size=8)
    torch.manual_seed(0)
    decoder = randomise_outputs(
        tiny_decoder(unet_overrides=dict(self_cond=True), learned_variance=False, image_cond_drop_prob=0.0)
    )
    torch.nn.init.normal_(decoder.unets[0].init_conv.weight, std=0.3)
    draws = _fixed_draws()
    on = decoder(images, image_embed=embeds, draws=TrainingDraws(times=draws.times, noise=draws.noise, self_cond=True))
    off = decoder(
        images, image_embed=embeds, draws=TrainingDraws(times=draws.times, noise=draws.noise, self_cond=False)
    )
    assert on.item() != pytest.approx(off.item(), rel=1e-6)
    # Without a fixed draw, the batch is self-conditioned with probability self_cond_prob.
    torch.manual_seed(0)
    values = {round(decoder(images, image_embed=embeds, draws=draws).item(), 6) for _ in range(8)}
    assert values == {round(on.item(), 6), round(off.item(), 6)}
    never = randomise_outputs(
        tiny_decoder(
            unet_overrides=dict(self_cond=True), learned_variance=False, image_cond_drop_prob=0.0, self_cond_prob=0.0
        )
    )
    never.load_state_dict(decoder.state_dict())
    assert never(images, image_embed=embeds, draws=draws).item() == pytest.approx(off.item(), rel=1e-6)
    ours = tiny_decoder(unet_overrides=dict(self_cond=True), self_cond_x_start=True, image_cond_drop_prob=0.0)
    assert torch.isfinite(ours(images, image_embed=embeds))


def test_training_draws_fix_every_random_choice():
    decoder = randomise_outputs(
        tiny_decoder(num_unets=2, use_noise_for_lowres_cond=True, image_cond_drop_prob=0.0, text_cond_drop_prob=0.0)
    )
    images, embeds = batch(size=16)
    g = torch.Generator().manual_seed(1)
    draws = TrainingDraws(
        times=torch.tensor([1, 2, 3, 4]),
        noise=torch.randn(4, 3, 16, 16, generator=g),
        lowres_noise_level=torch.tensor([0, 10, 500, 999]),
        lowres_noise=torch.randn(4, 3, 16, 16, generator=g),
        blur=(True, 0.8, 3),
    )
    a = decoder(images, image_embed=embeds, unet_number=2, draws=draws)
    torch.manual_seed(123)
    assert torch.equal(decoder(images, image_embed=embeds, unet_number=2, draws=draws), a)
    unblurred = TrainingDraws(**{**draws.__dict__, "blur": (False, 0.0, 0)})
    assert not torch.equal(decoder(images, image_embed=embeds, unet_number=2, draws=unblurred), a)


def test_images_in_minus_one_to_one_without_normalisation():
    decoder = randomise_outputs(tiny_decoder(auto_normalize_img=False, timesteps=5))
    normalising = tiny_decoder(timesteps=5)
    normalising.load_state_dict(decoder.state_dict())
    images, embeds = batch(size=8)
    draws = _fixed_draws(seed=4)
    draws.times = draws.times.clamp(max=4)
    # The same networks on inputs that differ by the rounding of * 2 - 1: the network's bound.
    assert_close_to_scale(
        decoder(images * 2 - 1, image_embed=embeds, draws=draws),
        normalising(images, image_embed=embeds, draws=draws),
        ulps_of_scale=NETWORK,
        what="loss",
    )
    assert_close_to_scale(
        decoder.sample(image_embed=embeds, seed=1),
        normalising.sample(image_embed=embeds, seed=1) * 2 - 1,
        ulps_of_scale=NETWORK,
        what="samples",
    )


# -------------------------------------------------------------------- cascade
def test_decoder_casts_the_unets():
    decoder = tiny_decoder(num_unets=2, use_noise_for_lowres_cond=True)
    first, second = decoder.unets
    assert not first.lowres_cond and second.lowres_cond and second.lowres_noise_cond
    # As DALLE2-pytorch (and the unCLIP paper): only the first U-Net sees the image embedding.
    assert first.cond_on_image_embeds and not second.cond_on_image_embeds
    everywhere = tiny_decoder(num_unets=2, image_embed_all_unets=True)
    assert all(unet.cond_on_image_embeds for unet in everywhere.unets)
    unconditional = tiny_decoder(unconditional=True, unet_overrides=dict(image_embed_dim=None))
    assert not unconditional.unets[0].cond_on_image_embeds
    # An upsampler needs no image_embed_dim; U-Net 1 of a conditional decoder does.
    Decoder([tiny_unet(), tiny_unet(image_embed_dim=None)], image_sizes=[8, 16], beta_schedule="cosine")
    with pytest.raises(ValueError, match="U-Net 1 .*needs image_embed_dim"):
        Decoder([tiny_unet(image_embed_dim=None)], image_sizes=[8])
    with pytest.raises(ValueError, match="U-Net 2 .*needs image_embed_dim"):
        Decoder([tiny_unet(), tiny_unet(image_embed_dim=None)], image_sizes=[8, 16], image_embed_all_unets=True)


def test_upsampler_ignores_the_image_embedding():
    decoder = randomise_outputs(tiny_decoder(num_unets=2, blur_prob=0.0))
    images, embeds = batch(size=16)
    draws = TrainingDraws(times=torch.tensor([3, 5, 7, 9]), noise=torch.randn(4, 3, 16, 16))
    a = decoder(images, image_embed=embeds, unet_number=2, draws=draws)
    b = decoder(images, image_embed=torch.randn_like(embeds), unet_number=2, draws=draws)
    assert torch.equal(a, b)
    c = decoder(
        images,
        image_embed=embeds,
        unet_number=1,
        draws=TrainingDraws(times=draws.times, noise=draws.noise[..., :8, :8]),
    )
    d = decoder(
        images,
        image_embed=torch.randn_like(embeds),
        unet_number=1,
        draws=TrainingDraws(times=draws.times, noise=draws.noise[..., :8, :8]),
    )
    assert not torch.equal(c, d)


def test_two_unet_cascade_trains_each_unet():
    decoder = tiny_decoder(num_unets=2, use_noise_for_lowres_cond=True)
    images, embeds = batch(size=16)
    for number in (1, 2):
        decoder.zero_grad(set_to_none=True)
        decoder(images, image_embed=embeds, unet_number=number).backward()
        trained, other = decoder.unets[number - 1], decoder.unets[2 - number]
        assert all(p.grad is None for p in other.parameters())
        assert sum(p.grad.abs().sum() for p in trained.parameters() if p.grad is not None) > 0
    before = [p.detach().clone() for p in decoder.unets[1].parameters()]
    opt = torch.optim.SGD(decoder.unets[1].parameters(), lr=0.1)
    decoder.zero_grad()
    decoder(images, image_embed=embeds, unet_number=2).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, decoder.unets[1].parameters()))
    with pytest.raises(ValueError, match="numbered from 1"):
        decoder(images, image_embed=embeds, unet_number=0)


def test_per_unet_options_and_their_length_check():
    decoder = tiny_decoder(
        num_unets=2, beta_schedule=["cosine", "linear"], learned_variance=[True, False], timesteps=25
    )
    assert [d.beta_schedule for d in decoder.diffusions] == ["cosine", "linear"]
    assert [u.channels_out for u in decoder.unets] == [6, 3]
    with pytest.raises(ValueError, match="2 U-Nets"):
        tiny_decoder(num_unets=2, beta_schedule=["cosine"])


def test_reference_defaults_for_schedules_and_learned_variance():
    # beta_schedule left out: cosine, and linear for the last U-Net of a cascade.
    pair = Decoder([tiny_unet(), tiny_unet()], image_sizes=[8, 16], timesteps=25)
    assert [d.beta_schedule for d in pair.diffusions] == ["cosine", "linear"]
    triple = Decoder([tiny_unet(), tiny_unet(), tiny_unet()], image_sizes=[4, 8, 16], timesteps=25)
    assert [d.beta_schedule for d in triple.diffusions] == ["cosine", "cosine", "linear"]
    assert Decoder(tiny_unet(), image_sizes=[8]).diffusions[0].beta_schedule == "cosine"
    # learned_variance true (the default) or a short list is padded with false: the first U-Net only.
    assert pair.learned_variance == [True, False] and [u.channels_out for u in pair.unets] == [6, 3]
    short = Decoder(
        [tiny_unet(), tiny_unet(), tiny_unet()],
        image_sizes=[4, 8, 16],
        beta_schedule="cosine",
        learned_variance=[False, True],
    )
    assert short.learned_variance == [False, True, False]
    with pytest.raises(ValueError, match="learned_variance has 3 entries"):
        tiny_decoder(learned_variance=[True, True, True])


def test_lowres_flags_per_unet():
    three = [tiny_unet(), tiny_unet(), tiny_unet()]
    decoder = Decoder(
        three,
        image_sizes=[4, 8, 16],
        beta_schedule="cosine",
        use_noise_for_lowres_cond=[True, False],
        use_blur_for_lowres_cond=[False, False, True],
    )
    assert [u.lowres_noise_cond for u in decoder.unets] == [False, True, False]
    assert [c.use_blur for c in decoder.lowres_conditioners[1:]] == [False, True]
    with pytest.raises(ValueError, match="U-Net 2 .*noise or blur"):
        Decoder(three, image_sizes=[4, 8, 16], beta_schedule="cosine", use_blur_for_lowres_cond=False)
    with pytest.raises(ValueError, match=r"use_noise_for_lowres_cond\[0\]"):
        Decoder(three, image_sizes=[4, 8, 16], beta_schedule="cosine", use_noise_for_lowres_cond=[True, True, True])
    with pytest.raises(ValueError, match="one per upsampler"):
        Decoder(three, image_sizes=[4, 8, 16], beta_schedule="cosine", use_noise_for_lowres_cond=[True])


def test_lowres_augmentations():
    torch.manual_seed(0)
    image = torch.rand(4, 3, 16, 16)
    sharp = LowresConditioner(use_blur=False)
    clean, level = sharp(image, target_size=16, downsample_size=8)
    # Nearest-neighbour down and up again: 2x2 blocks of one source pixel each.
    assert level is None and clean.shape == (4, 3, 16, 16)
    expected = image[..., ::2, ::2].repeat_interleave(2, -1).repeat_interleave(2, -2)
    torch.testing.assert_close(clean, expected, rtol=0, atol=0)  # pixels picked, not computed: exact
    blurred = LowresConditioner(use_blur=True, blur_prob=1.0, blur_sigma=(0.5, 2.0), blur_kernel_size=5)
    soft, _ = blurred(image, target_size=16, downsample_size=8)
    assert soft.diff(dim=-1).abs().mean() < clean.diff(dim=-1).abs().mean()
    # One blur decision per batch: with the decision fixed to "no", the output is the sharp one.
    not_blurred = blurred(image, target_size=16, downsample_size=8, blur=(False, 0.0, 0))[0]
    torch.testing.assert_close(not_blurred, clean, rtol=0, atol=0)
    never = LowresConditioner(use_blur=True, blur_prob=0.0)
    torch.testing.assert_close(never(image, target_size=16, downsample_size=8)[0], clean, rtol=0, atol=0)
    noisy = LowresConditioner(use_blur=False, use_noise=True)
    out, levels = noisy(image, target_size=16, downsample_size=8)
    assert levels.min() >= 0 and levels.max() < 1000 and not torch.allclose(out, clean)
    # The augmentation schedule is the reference's fixed 1000-step linear one, whatever the decoder's T.
    fixed = torch.full((4,), 999)
    noise = torch.randn(4, 3, 16, 16)
    out, _ = noisy(image, target_size=16, downsample_size=8, noise_level=fixed, noise=noise)
    schedule = noisy.noise_schedule
    assert schedule.num_timesteps == 1000 and schedule.beta_schedule == "linear"
    expected = (schedule.q_sample(clean * 2 - 1, fixed, noise) + 1) / 2
    assert_close_to_scale(out, expected, ulps_of_scale=FEW_ROUNDINGS, what="noised low-res")  # the formula by hand


def test_gaussian_blur_preserves_constants_and_mass():
    image = torch.full((2, 3, 8, 8), 0.7)
    # each output is two passes of 5-term sums with weights normalised to 1 (each within a few roundings)
    assert_close_to_scale(gaussian_blur(image, 1.5, 5), image, ulps_of_scale=2 * FEW_ROUNDINGS, what="constant")
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[..., 4, 4] = 1
    out = gaussian_blur(impulse, 1.0, 3)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-6)
    k = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / 2)
    k = k / k.sum()
    assert_close_to_scale(out[0, 0, 3:6, 3:6], k[:, None] * k[None, :], ulps_of_scale=FEW_ROUNDINGS, what="kernel")


def test_random_crop_trains_upsampler_on_patches():
    decoder = tiny_decoder(num_unets=2, random_crop_sizes=[None, 8])
    images, embeds = batch(size=16)
    assert torch.isfinite(decoder(images, image_embed=embeds, unet_number=2))
    # One offset per sample (as kornia's RandomCrop in the reference), the same for image and low-res input.
    target = torch.arange(4 * 16 * 16, dtype=torch.float32).reshape(4, 1, 16, 16).expand(4, 3, 16, 16)
    torch.manual_seed(0)
    crops, same = decoder._random_crop(8, target, target + 1)
    assert crops.shape == (4, 3, 8, 8) and torch.equal(same, crops + 1)
    corners = [int(crops[i, 0, 0, 0]) - i * 256 for i in range(4)]
    torch.manual_seed(0)
    tops, lefts = torch.randint(0, 9, (4,)).tolist(), torch.randint(0, 9, (4,)).tolist()
    assert corners == [top * 16 + left for top, left in zip(tops, lefts)] and len(set(corners)) > 1


def test_compat_only_options_warn_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_decoder(predict_x_start_for_latent_diffusion=True)
        tiny_decoder(predict_x_start_for_latent_diffusion=True)
    messages = [str(w.message) for w in caught if "predict_x_start_for_latent_diffusion" in str(w.message)]
    assert len(messages) == 1 and "no effect" in messages[0]


# -------------------------------------------------------------------- sampling
@pytest.mark.parametrize("sample_timesteps", [None, 4])
def test_sampling_shape_range_and_determinism(sample_timesteps):
    decoder = randomise_outputs(
        tiny_decoder(num_unets=2, sample_timesteps=sample_timesteps, timesteps=10, use_noise_for_lowres_cond=True)
    )
    _, embeds = batch(n=2)
    a = decoder.sample(image_embed=embeds, cond_scale=2.0, seed=7)
    assert a.shape == (2, 3, 16, 16) and a.std() > 0
    if sample_timesteps is None:
        # DDPM's last step returns the clamped x_0 estimate itself.
        assert a.min() >= 0 and a.max() <= 1
    else:
        # DDIM (as the reference) stops at alpha_bar_0 < 1 (0.97 at T = 10) and is not clamped: near [0, 1] only.
        assert a.min() > -0.5 and a.max() < 1.5
    torch.testing.assert_close(decoder.sample(image_embed=embeds, cond_scale=2.0, seed=7), a, rtol=0, atol=0)
    assert not torch.equal(decoder.sample(image_embed=embeds, cond_scale=2.0, seed=8), a)


def test_replayed_noise_reproduces_sampling_and_checks_what_it_is_given():
    decoder = randomise_outputs(tiny_decoder(timesteps=5))
    _, embeds = batch(n=2)
    drawn = []

    def recording(shape, device, dtype):
        drawn.append(torch.randn(shape, device=device, dtype=dtype))
        return drawn[-1]

    a = decoder.sample(image_embed=embeds, noise=recording)
    assert len(drawn) == 1 + 5  # the start, then one per DDPM step (the last unused, drawn as the reference)
    replay = ReplayedNoise(drawn)
    torch.testing.assert_close(decoder.sample(image_embed=embeds, noise=replay), a, rtol=0, atol=0)
    assert replay.used == 6
    torch.testing.assert_close(decoder.sample(image_embed=embeds, noise=list(drawn)), a, rtol=0, atol=0)
    with pytest.raises(ValueError, match="only 3 were given"):
        decoder.sample(image_embed=embeds, noise=drawn[:3])
    with pytest.raises(ValueError, match="shape"):
        decoder.sample(image_embed=embeds, noise=[torch.zeros(1, 3, 8, 8)] * 6)


def test_guidance_needs_condition_dropout():
    decoder = tiny_decoder(timesteps=5, image_cond_drop_prob=0.0, text_cond_drop_prob=0.0)
    _, embeds = batch(n=2)
    with pytest.raises(ValueError, match="cond_scale"):
        decoder.sample(image_embed=embeds, cond_scale=2.0, seed=0)
    assert decoder.sample(image_embed=embeds, cond_scale=1.0, seed=0).shape == (2, 3, 8, 8)


@pytest.mark.parametrize("sample_timesteps", [None, 3])
def test_inpainting_keeps_the_known_region_and_fills_the_rest(sample_timesteps):
    decoder = randomise_outputs(tiny_decoder(num_unets=2, timesteps=6, sample_timesteps=sample_timesteps))
    images, embeds = batch(n=2, size=16)
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, :, :8] = True
    out = decoder.sample(image_embed=embeds, inpaint_image=images, inpaint_mask=mask, inpaint_resample_times=2, seed=0)
    assert torch.equal(out[:, :, mask[0]], images[:, :, mask[0]])
    plain = decoder.sample(image_embed=embeds, seed=0)
    assert not torch.allclose(out[:, :, ~mask[0]], images[:, :, ~mask[0]])
    assert not torch.allclose(out, plain)
    # More resampling draws more noise: (resample_times) denoisings and re-noisings per step.
    counts = {}
    for times in (1, 3):
        drawn = []
        decoder.sample(
            image_embed=embeds,
            inpaint_image=images,
            inpaint_mask=mask,
            inpaint_resample_times=times,
            noise=lambda shape, device, dtype, drawn=drawn: (
                drawn.append(1) or torch.randn(shape, device=device, dtype=dtype)
            ),
        )
        counts[times] = len(drawn)
    assert counts[3] > 2 * counts[1]
    with pytest.raises(ValueError, match="both inpaint_image and inpaint_mask"):
        decoder.sample(image_embed=embeds, inpaint_image=images)
    with pytest.raises(ValueError, match="inpaint_mask must be"):
        decoder.sample(image_embed=embeds, inpaint_image=images, inpaint_mask=mask[:, None])


def test_sampling_start_and_stop_at_unet_numbers():
    decoder = randomise_outputs(tiny_decoder(num_unets=2, timesteps=5))
    _, embeds = batch(n=2)
    low = decoder.sample(image_embed=embeds, stop_at_unet_number=1, seed=0)
    assert low.shape == (2, 3, 8, 8)
    high = decoder.sample(image_embed=embeds, start_at_unet_number=2, image=low, seed=0)
    assert high.shape == (2, 3, 16, 16)
    other = decoder.sample(image_embed=embeds, start_at_unet_number=2, image=1 - low, seed=0)
    assert not torch.allclose(high, other)  # the given image is the upsampler's low-res input
    with pytest.raises(ValueError, match="image"):
        decoder.sample(image_embed=embeds, start_at_unet_number=2)


def test_unconditional_decoder_samples_with_batch_size():
    decoder = tiny_decoder(unconditional=True, timesteps=5, unet_overrides=dict(image_embed_dim=None))
    images, _ = batch(size=8)
    assert torch.isfinite(decoder(images))
    assert decoder.sample(batch_size=3, seed=0).shape == (3, 3, 8, 8)


def test_sampling_with_text_and_self_conditioning():
    decoder = randomise_outputs(
        tiny_decoder(
            timesteps=5,
            unet_overrides=dict(cond_on_text_encodings=True, text_embed_dim=6, self_cond=True),
            use_dynamic_thres=True,
            predict_v=True,
        )
    )
    images, embeds = batch(size=8)
    text = torch.randn(4, 3, 6)
    mask = torch.tensor([[True, True, False]] * 4)
    assert torch.isfinite(decoder(images, image_embed=embeds, text_encodings=text, text_mask=mask))
    out = decoder.sample(image_embed=embeds, text_encodings=text, text_mask=mask, cond_scale=3.0, seed=0)
    assert out.shape == (4, 3, 8, 8)


# -------------------------------------------------------------------- it learns
@pytest.mark.slow
def test_tiny_decoder_memorises_eight_images():
    torch.manual_seed(0)
    unet = Unet(
        8,
        image_embed_dim=EMBED,
        cond_dim=8,
        dim_mults=(1, 2),
        num_resnet_blocks=1,
        attn_heads=2,
        attn_dim_head=8,
        cross_attn_heads=2,
        cross_attn_dim_head=8,
        init_cross_embed=False,
        init_conv_kernel_size=3,
    )
    decoder = Decoder([unet], image_sizes=[16], timesteps=100, learned_variance=False, image_cond_drop_prob=0.0)
    # Eight structured images (stripes of different frequencies and colours) and their "embeddings".
    g = torch.Generator().manual_seed(0)
    xs = torch.linspace(0, 1, 16)
    images = torch.stack(
        [
            (torch.sin(xs * (i + 1) * 3) * 0.5 + 0.5)[None, None, :].expand(3, 16, 16)
            * torch.rand(3, 1, 1, generator=g)
            for i in range(8)
        ]
    )
    embeds = torch.randn(8, EMBED, generator=g)

    def held_out_loss() -> float:
        torch.manual_seed(123)  # the same timesteps and noise every time
        with torch.no_grad():
            return sum(decoder(images, image_embed=embeds).item() for _ in range(8)) / 8

    start = held_out_loss()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=2e-3)
    torch.manual_seed(0)
    for _ in range(150):
        loss = decoder(images, image_embed=embeds)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = held_out_loss()
    assert start > 0.9  # zero-initialised output: the first prediction of eps is 0, loss ~ E[eps^2] = 1
    assert end < 0.2 * start, (start, end)
