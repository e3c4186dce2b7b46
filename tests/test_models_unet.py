"""The U-Net: shapes, options, conditioning, classifier-free guidance, the constructor contract."""
import inspect

import pytest
import torch

from dalle2_decoder.models import Decoder, Unet

EMBED, TEXT = 12, 10


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(**overrides) -> Unet:
    kwargs = dict(
        dim=8,
        image_embed_dim=EMBED,
        text_embed_dim=TEXT,
        cond_dim=8,
        dim_mults=(1, 2),
        attn_heads=2,
        attn_dim_head=4,
        cross_attn_heads=2,
        cross_attn_dim_head=4,
        num_resnet_blocks=1,
        cond_on_image_embeds=True,
        cond_on_text_encodings=True,
        max_text_len=6,
        init_cross_embed_kernel_sizes=(3, 5),
    )
    kwargs.update(overrides)
    return Unet(**kwargs)


def inputs(batch=2, size=8, text_len=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, 3, size, size, generator=g),
        time=torch.randint(0, 100, (batch,), generator=g),
        image_embed=torch.randn(batch, EMBED, generator=g),
        text_encodings=torch.randn(batch, text_len, TEXT, generator=g),
    )


def randomise_output(unet: Unet) -> Unet:
    # The output conv starts at zero (so every prediction is 0); give it weights for comparisons.
    torch.manual_seed(1)
    torch.nn.init.normal_(unet.final_conv.weight, std=0.5)
    return unet


def run(unet, batch, **kwargs):
    batch = dict(batch)
    x, time = batch.pop("x"), batch.pop("time")
    return unet(x, time, **batch, **kwargs)


# -------------------------------------------------------------------- contract
@pytest.mark.parametrize("cls, positional", [(Unet, {"dim"}), (Decoder, {"unets", "image_sizes"})])
def test_constructor_contract_keyword_only_defaults_and_documented(cls, positional):
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    doc = cls.__doc__
    for p in params:
        assert f"{p.name}:" in doc, f"{cls.__name__}.{p.name} is not described in the class docstring"
        if p.name in positional:
            continue
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, p.name
        assert p.default is not inspect.Parameter.empty, p.name


def test_reference_unet_option_names_are_accepted():
    names = set(inspect.signature(Unet.__init__).parameters)
    reference = {
        "dim", "image_embed_dim", "text_embed_dim", "cond_dim", "channels", "dim_mults", "self_attn", "attn_dim_head",
        "attn_heads", "cond_on_text_encodings", "lowres_cond", "init_cross_embed", "num_resnet_blocks", "resnet_groups",
        "memory_efficient", "attend_at_middle", "init_dim", "num_image_tokens", "num_time_tokens", "sparse_attn",
        "max_text_len", "cond_on_image_embeds", "add_image_embeds_to_time", "pixel_shuffle_upsample",
        "checkpoint_during_training", "channels_out", "out_dim", "self_cond", "lowres_noise_cond",
    }
    assert reference <= names


# -------------------------------------------------------------------- shapes and options
def test_output_shape_and_channels_out():
    unet = tiny_unet(channels_out=6)
    out = run(unet, inputs())
    assert out.shape == (2, 6, 8, 8)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(self_attn=[False, True]),
        dict(self_attn=True, attend_at_middle=False),
        dict(memory_efficient=True),
        dict(sparse_attn=True),
        dict(cosine_sim_cross_attn=True, cosine_sim_self_attn=True, self_attn=True),
        dict(resnet_weight_standardization=True),
        dict(cross_embed_downsample=True),
        dict(pixel_shuffle_upsample=False),
        dict(combine_upsample_fmaps=True),
        dict(init_cross_embed=False, init_conv_kernel_size=3, final_conv_kernel_size=3),
        dict(scale_skip_connection=True),
        dict(num_resnet_blocks=[0, 2], resnet_groups=[4, 8]),
        dict(init_dim=16, dim_mults=(1, 2, 2)),
        dict(add_image_embeds_to_time=False),
        dict(cond_on_text_encodings=False),
    ],
)
def test_options_build_and_train(overrides):
    torch.manual_seed(0)
    unet = randomise_output(tiny_unet(**overrides))
    out = run(unet, inputs())
    assert out.shape == (2, 3, 8, 8)
    out.square().mean().backward()
    assert unet.init_conv.parameters().__next__().grad.abs().sum() > 0


def test_options_change_the_network():
    base = sum(p.numel() for p in tiny_unet().parameters())
    for overrides in [dict(self_attn=True), dict(sparse_attn=True), dict(num_resnet_blocks=2), dict(dim_mults=(1, 2, 4)),
                      dict(attn_heads=4, self_attn=True), dict(cond_dim=16), dict(combine_upsample_fmaps=True)]:
        assert sum(p.numel() for p in tiny_unet(**overrides).parameters()) != base, overrides


def test_lowres_and_self_cond_inputs_are_used():
    torch.manual_seed(0)
    unet = randomise_output(tiny_unet(lowres_cond=True, self_cond=True))
    batch = inputs()
    lowres = torch.randn(2, 3, 8, 8)
    a = run(unet, batch, lowres_cond_img=lowres)
    assert not torch.allclose(a, run(unet, batch, lowres_cond_img=lowres + 1))
    assert not torch.allclose(a, run(unet, batch, lowres_cond_img=lowres, self_cond=torch.ones(2, 3, 8, 8)))
    with pytest.raises(ValueError, match="lowres_cond_img"):
        run(unet, batch)


def test_lowres_noise_level_conditions_the_network():
    torch.manual_seed(0)
    unet = randomise_output(tiny_unet(lowres_cond=True, lowres_noise_cond=True))
    batch, lowres = inputs(), torch.randn(2, 3, 8, 8)
    a = run(unet, batch, lowres_cond_img=lowres, lowres_noise_level=torch.tensor([0, 0]))
    b = run(unet, batch, lowres_cond_img=lowres, lowres_noise_level=torch.tensor([500, 500]))
    assert not torch.allclose(a, b)


def test_bad_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible"):
        run(tiny_unet(), inputs(size=7))


# -------------------------------------------------------------------- conditioning
def test_image_embedding_and_text_condition_the_output():
    torch.manual_seed(0)
    unet = randomise_output(tiny_unet()).eval()
    batch = inputs()
    a = run(unet, batch)
    assert not torch.allclose(a, run(unet, {**batch, "image_embed": batch["image_embed"] + 1}))
    assert not torch.allclose(a, run(unet, {**batch, "text_encodings": batch["text_encodings"] + 1}))


def test_dropped_conditioning_uses_the_null_embeddings():
    torch.manual_seed(0)
    unet = randomise_output(tiny_unet())
    batch = inputs()
    dropped = run(unet, batch, image_cond_drop_prob=1.0, text_cond_drop_prob=1.0)
    # The real conditioning no longer matters ...
    other = {**batch, "image_embed": torch.randn(2, EMBED), "text_encodings": torch.randn(2, 4, TEXT)}
    torch.testing.assert_close(dropped, run(unet, other, image_cond_drop_prob=1.0, text_cond_drop_prob=1.0))
    # ... the null embeddings do, and they get the gradient.
    dropped.square().mean().backward()
    for name in ("null_image_tokens", "null_image_hiddens", "null_text_tokens"):
        assert getattr(unet, name).grad.abs().sum() > 0, name
    with torch.no_grad():
        unet.null_image_tokens.add_(1.0)
    assert not torch.allclose(dropped, run(unet, batch, image_cond_drop_prob=1.0, text_cond_drop_prob=1.0))


def test_drop_probability_drops_some_samples_only():
    torch.manual_seed(0)
    unet = randomise_output(tiny_unet()).eval()
    batch = inputs(batch=64)
    kept = run(unet, batch)
    image_dropped = run(unet, batch, image_cond_drop_prob=1.0)
    torch.manual_seed(3)
    mixed = run(unet, batch, image_cond_drop_prob=0.5)
    same_as_kept = torch.isclose(mixed, kept).flatten(1).all(1)
    same_as_dropped = torch.isclose(mixed, image_dropped).flatten(1).all(1)
    assert 10 < same_as_kept.sum() < 54  # about half of 64
    assert torch.all(same_as_kept ^ same_as_dropped)  # every sample is exactly one of the two


def test_text_mask_hides_padding():
    torch.manual_seed(0)
    unet = randomise_output(tiny_unet()).eval()
    batch = inputs()
    mask = torch.tensor([[True, True, False, False]] * 2)
    a = run(unet, batch, text_mask=mask)
    changed = batch["text_encodings"].clone()
    changed[:, 2:] += 5.0
    torch.testing.assert_close(a, run(unet, {**batch, "text_encodings": changed}, text_mask=mask))
    assert not torch.allclose(a, run(unet, {**batch, "text_encodings": changed}))


def test_text_longer_than_max_text_len_is_truncated():
    unet = randomise_output(tiny_unet(max_text_len=3)).eval()
    batch = inputs(text_len=5)
    changed = batch["text_encodings"].clone()
    changed[:, 3:] += 5.0
    torch.testing.assert_close(run(unet, batch), run(unet, {**batch, "text_encodings": changed}))


def test_cond_scale_one_equals_plain_conditional_prediction():
    torch.manual_seed(0)
    unet = randomise_output(tiny_unet(channels_out=6)).eval()
    batch = inputs()
    x, time = batch.pop("x"), batch.pop("time")
    plain = unet(x, time, **batch)
    torch.testing.assert_close(unet.forward_with_cond_scale(x, time, cond_scale=1.0, **batch), plain)


def test_cond_scale_extrapolates_from_the_null_prediction():
    torch.manual_seed(0)
    unet = randomise_output(tiny_unet(channels_out=6)).eval()
    batch = inputs()
    x, time = batch.pop("x"), batch.pop("time")
    cond = unet(x, time, **batch)
    null = unet(x, time, **batch, image_cond_drop_prob=1.0, text_cond_drop_prob=1.0)
    guided = unet.forward_with_cond_scale(x, time, cond_scale=3.0, **batch)
    torch.testing.assert_close(guided[:, :3], null[:, :3] + 3.0 * (cond[:, :3] - null[:, :3]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(guided[:, 3:], cond[:, 3:], atol=1e-5, rtol=1e-4)  # variance channels unguided


# -------------------------------------------------------------------- performance options
def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = randomise_output(tiny_unet(self_attn=True))
    checkpointed = tiny_unet(self_attn=True, checkpoint_during_training=True)
    checkpointed.load_state_dict(plain.state_dict())
    batch = inputs()
    for unet in (plain, checkpointed):
        run(unet, batch).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_and_channels_last_match_fp32():
    torch.manual_seed(0)
    unet = randomise_output(tiny_unet(self_attn=True, sparse_attn=True))
    batch = inputs()
    reference = run(unet, batch)
    unet = unet.to(memory_format=torch.channels_last)
    batch["x"] = batch["x"].contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(unet, batch)
    assert torch.isfinite(out).all()
    assert (out.float() - reference).abs().mean() < 0.1 * reference.abs().mean()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in unet.parameters() if p.grad is not None)


def test_with_settings_rebuilds_only_when_something_changes():
    unet = tiny_unet()
    assert unet.with_settings(channels=3, lowres_cond=False) is unet
    upsampler = unet.with_settings(lowres_cond=True)
    assert upsampler is not unet and upsampler.lowres_cond and upsampler.config["dim"] == 8
