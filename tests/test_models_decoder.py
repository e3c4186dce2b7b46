"""The Decoder: losses, learned variance, the cascade, low-res conditioning, sampling, training."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from dalle2_decoder.models import Decoder, Unet
from dalle2_decoder.models.lowres import LowresConditioner, gaussian_blur

EMBED = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(**overrides) -> Unet:
    kwargs = dict(
        dim=8, image_embed_dim=EMBED, cond_dim=8, dim_mults=(1, 2), num_resnet_blocks=1, attn_heads=2, attn_dim_head=4,
        cross_attn_heads=2, cross_attn_dim_head=4, init_cross_embed=False, init_conv_kernel_size=3,
    )
    kwargs.update(overrides)
    return Unet(**kwargs)


def tiny_decoder(num_unets=1, unet_overrides=None, **overrides) -> Decoder:
    kwargs = dict(image_sizes=[8, 16][:num_unets], timesteps=20)
    kwargs.update(overrides)
    return Decoder([tiny_unet(**(unet_overrides or {})) for _ in range(num_unets)], **kwargs)


def batch(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randn(n, EMBED, generator=g)


def randomise_outputs(decoder: Decoder) -> Decoder:
    torch.manual_seed(1)
    for unet in decoder.unets:
        torch.nn.init.normal_(unet.final_conv.weight, std=0.3)
    return decoder


# -------------------------------------------------------------------- losses
@pytest.mark.parametrize("loss_type, loss_fn", [("l1", F.l1_loss), ("l2", F.mse_loss), ("huber", F.smooth_l1_loss)])
@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_each_loss_type_and_objective_matches_a_manual_computation(loss_type, loss_fn, objective):
    decoder = randomise_outputs(
        tiny_decoder(loss_type=loss_type, learned_variance=False, image_cond_drop_prob=0.0,
                     predict_x_start=objective == "x0", predict_v=objective == "v")
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
    torch.testing.assert_close(loss, loss_fn(pred, target))


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
    w = diffusion.p2_loss_weight(t, 1.0, 1.0) if "p2_loss_weight_gamma" in weighting else diffusion.min_snr_loss_weight(t, 5.0, "eps")
    per_sample = []
    for i in range(4):  # one sample at a time with the same timestep and noise draws
        torch.manual_seed(5)
        torch.randint(0, 20, (4,))
        noise = torch.randn(4, 3, 8, 8)[i : i + 1]
        x_t = diffusion.q_sample(images[i : i + 1] * 2 - 1, t[i : i + 1], noise)
        per_sample.append(F.mse_loss(plain.unets[0](x_t, t[i : i + 1], image_embed=embeds[i : i + 1]), noise))
    torch.manual_seed(5)
    torch.testing.assert_close(weighted(images, image_embed=embeds), (torch.stack(per_sample) * w).mean(), atol=1e-5, rtol=1e-4)


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
        weight_grad = decoder.unets[0].final_conv.weight.grad
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
    grad = decoder.unets[0].final_conv.weight.grad
    assert grad[:3].abs().sum() == 0 and grad[3:].abs().sum() > 0
    assert 0 < vb_only < full


# -------------------------------------------------------------------- cascade
def test_decoder_casts_the_unets():
    decoder = tiny_decoder(num_unets=2, use_noise_for_lowres_cond=True)
    first, second = decoder.unets
    assert not first.lowres_cond and second.lowres_cond and second.lowres_noise_cond
    assert first.cond_on_image_embeds and second.cond_on_image_embeds
    unconditional = tiny_decoder(unconditional=True, unet_overrides=dict(image_embed_dim=None))
    assert not unconditional.unets[0].cond_on_image_embeds


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
    decoder = tiny_decoder(num_unets=2, beta_schedule=["cosine", "linear"], learned_variance=[True, False])
    assert [d.beta_schedule for d in decoder.diffusions] == ["cosine", "linear"]
    assert [u.channels_out for u in decoder.unets] == [6, 3]
    with pytest.raises(ValueError, match="2 U-Nets"):
        tiny_decoder(num_unets=2, beta_schedule=["cosine"])


def test_lowres_augmentations():
    torch.manual_seed(0)
    image = torch.rand(4, 3, 16, 16)
    sharp = LowresConditioner(timesteps=100, use_blur=False)
    blurred = LowresConditioner(timesteps=100, use_blur=True, blur_prob=1.0, blur_sigma=(0.5, 2.0), blur_kernel_size=5)
    clean, level = sharp(image, 8, 16, training=True)
    assert level is None and clean.shape == (4, 3, 16, 16) and clean.min() >= -1 and clean.max() <= 1
    soft, _ = blurred(image, 8, 16, training=True)
    assert soft.diff(dim=-1).abs().mean() < clean.diff(dim=-1).abs().mean()
    # No blur at sampling time.
    torch.testing.assert_close(blurred(image, 8, 16, training=False)[0], clean)
    noisy = LowresConditioner(timesteps=100, use_blur=False, use_noise=True, noise_sample_level=0.3)
    out, level = noisy(image, 8, 16, training=False)
    assert torch.equal(level, torch.full((4,), 30)) and not torch.allclose(out, clean)
    _, train_levels = noisy(image, 8, 16, training=True)
    assert train_levels.unique().numel() > 1


def test_gaussian_blur_preserves_constants_and_mass():
    image = torch.full((2, 3, 8, 8), 0.7)
    torch.testing.assert_close(gaussian_blur(image, torch.tensor([0.5, 2.0]), 5), image)


def test_random_crop_trains_upsampler_on_patches():
    decoder = tiny_decoder(num_unets=2, random_crop_sizes=[None, 8])
    images, embeds = batch(size=16)
    assert torch.isfinite(decoder(images, image_embed=embeds, unet_number=2))


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
    decoder = randomise_outputs(tiny_decoder(num_unets=2, sample_timesteps=sample_timesteps, timesteps=10,
                                             use_noise_for_lowres_cond=True))
    _, embeds = batch(n=2)
    a = decoder.sample(image_embed=embeds, cond_scale=2.0, seed=7)
    assert a.shape == (2, 3, 16, 16)
    assert a.min() >= 0 and a.max() <= 1 and a.std() > 0
    torch.testing.assert_close(decoder.sample(image_embed=embeds, cond_scale=2.0, seed=7), a, rtol=0, atol=0)
    assert not torch.equal(decoder.sample(image_embed=embeds, cond_scale=2.0, seed=8), a)


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
        tiny_decoder(timesteps=5, unet_overrides=dict(cond_on_text_encodings=True, text_embed_dim=6, self_cond=True),
                     use_dynamic_thres=True, predict_v=True)
    )
    images, embeds = batch(size=8)
    text = torch.randn(4, 3, 6)
    mask = torch.tensor([[True, True, False]] * 4)
    assert torch.isfinite(decoder(images, image_embed=embeds, text_encodings=text, text_mask=mask))
    out = decoder.sample(image_embed=embeds, text_encodings=text, text_mask=mask, cond_scale=3.0, seed=0)
    assert out.shape == (4, 3, 8, 8)


# -------------------------------------------------------------------- it learns
def test_tiny_decoder_memorises_eight_images():
    torch.manual_seed(0)
    unet = Unet(8, image_embed_dim=EMBED, cond_dim=8, dim_mults=(1, 2), num_resnet_blocks=1, attn_heads=2, attn_dim_head=8,
                cross_attn_heads=2, cross_attn_dim_head=8, init_cross_embed=False, init_conv_kernel_size=3)
    decoder = Decoder([unet], image_sizes=[16], timesteps=100, learned_variance=False, image_cond_drop_prob=0.0)
    # Eight structured images (stripes of different frequencies and colours) and their "embeddings".
    g = torch.Generator().manual_seed(0)
    xs = torch.linspace(0, 1, 16)
    images = torch.stack([
        (torch.sin(xs * (i + 1) * 3) * 0.5 + 0.5)[None, None, :].expand(3, 16, 16) * torch.rand(3, 1, 1, generator=g)
        for i in range(8)
    ])
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
