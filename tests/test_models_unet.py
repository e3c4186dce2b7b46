"""The U-Net: shapes, options, conditioning, classifier-free guidance, the constructor contract."""

import inspect

import pytest
import torch

from dalle2_decoder.models import Decoder, Unet, _compat

from .numerics import NETWORK, assert_close_to_scale, scale_of_combination

EMBED, TEXT = 12, 10


pytestmark = pytest.mark.usefixtures("compute_threads")


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
    torch.nn.init.normal_(unet.to_out.weight, std=0.5)
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


# Every constructor option of DALLE2-pytorch 1.15.6's Unet with its default there.
REFERENCE_DEFAULTS = dict(
    image_embed_dim=None,
    text_embed_dim=None,
    cond_dim=None,
    num_image_tokens=4,
    num_time_tokens=2,
    out_dim=None,
    dim_mults=(1, 2, 4, 8),
    channels=3,
    channels_out=None,
    self_attn=False,
    attn_dim_head=32,
    attn_heads=16,
    lowres_cond=False,
    lowres_noise_cond=False,
    self_cond=False,
    sparse_attn=False,
    cosine_sim_cross_attn=False,
    cosine_sim_self_attn=False,
    attend_at_middle=True,
    cond_on_text_encodings=False,
    max_text_len=256,
    cond_on_image_embeds=False,
    add_image_embeds_to_time=True,
    init_dim=None,
    init_conv_kernel_size=7,
    resnet_groups=8,
    resnet_weight_standardization=False,
    num_resnet_blocks=2,
    init_cross_embed=True,
    init_cross_embed_kernel_sizes=(3, 7, 15),
    cross_embed_downsample=False,
    cross_embed_downsample_kernel_sizes=(2, 4),
    memory_efficient=False,
    scale_skip_connection=False,
    pixel_shuffle_upsample=True,
    final_conv_kernel_size=1,
    combine_upsample_fmaps=False,
    checkpoint_during_training=False,
)
# Ours, each off (= the reference's behaviour) by default.
OUR_OPTIONS = dict(cross_attn_heads=8, cross_attn_dim_head=64, respect_attend_at_middle=False, reference_release=None)


def test_every_reference_option_exists_with_the_reference_default_and_ours_are_off():
    params = {
        p.name: p.default for p in inspect.signature(Unet.__init__).parameters.values() if p.name not in ("self", "dim")
    }
    assert params == {**REFERENCE_DEFAULTS, **OUR_OPTIONS}


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
        dict(init_dim=8, dim_mults=(1, 2, 2)),
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
    for overrides in [
        dict(self_attn=True),
        dict(sparse_attn=True),
        dict(num_resnet_blocks=2),
        dict(dim_mults=(1, 2, 4)),
        dict(attn_heads=4, self_attn=True),
        dict(cond_dim=16),
        dict(combine_upsample_fmaps=True),
    ]:
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
    # (exactly: the null embeddings replace the inputs before any arithmetic)
    torch.testing.assert_close(
        dropped, run(unet, other, image_cond_drop_prob=1.0, text_cond_drop_prob=1.0), rtol=0, atol=0
    )
    # ... the null embeddings do, and they get the gradient.
    dropped.square().mean().backward()
    for name in ("null_image_embed", "null_image_hiddens", "null_text_embed"):
        assert getattr(unet, name).grad.abs().sum() > 0, name
    with torch.no_grad():
        unet.null_image_embed.add_(1.0)
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
    # exactly: the masked positions weigh 0 (any finite value times 0, or a masked-out logit)
    torch.testing.assert_close(a, run(unet, {**batch, "text_encodings": changed}, text_mask=mask), rtol=0, atol=0)
    assert not torch.allclose(a, run(unet, {**batch, "text_encodings": changed}))


def test_text_longer_than_max_text_len_is_truncated():
    unet = randomise_output(tiny_unet(max_text_len=3)).eval()
    batch = inputs(text_len=5)
    changed = batch["text_encodings"].clone()
    changed[:, 3:] += 5.0
    torch.testing.assert_close(run(unet, batch), run(unet, {**batch, "text_encodings": changed}), rtol=0, atol=0)


def test_cond_scale_one_equals_plain_conditional_prediction():
    torch.manual_seed(0)
    unet = randomise_output(tiny_unet(channels_out=6)).eval()
    batch = inputs()
    x, time = batch.pop("x"), batch.pop("time")
    plain = unet(x, time, **batch)
    torch.testing.assert_close(unet.forward_with_cond_scale(x, time, cond_scale=1.0, **batch), plain, rtol=0, atol=0)


def test_cond_scale_extrapolates_from_the_null_prediction():
    torch.manual_seed(0)
    unet = randomise_output(tiny_unet(channels_out=6)).eval()
    batch = inputs()
    x, time = batch.pop("x"), batch.pop("time")
    cond = unet(x, time, **batch)
    null = unet(x, time, **batch, image_cond_drop_prob=1.0, text_cond_drop_prob=1.0)
    # As in the reference, every output channel is guided, the learned-variance ones included ...
    guided = unet.forward_with_cond_scale(x, time, cond_scale=3.0, **batch)
    # (guided runs cond and null as one batch of 4: the network's arithmetic reordered, and each
    # error carried with its coefficient in (1 - 3) * null + 3 * cond)
    scale = scale_of_combination((-2.0, null), (3.0, cond))
    assert_close_to_scale(guided, null + 3.0 * (cond - null), ulps_of_scale=NETWORK, scale=scale, what="guided")
    # ... unless (our option) the variance channels are taken from the conditional prediction.
    mean_only = unet.forward_with_cond_scale(x, time, cond_scale=3.0, guide_learned_variance=False, **batch)
    torch.testing.assert_close(mean_only[:, :3], guided[:, :3], rtol=0, atol=0)  # the same batched computation
    assert_close_to_scale(mean_only[:, 3:], cond[:, 3:], ulps_of_scale=NETWORK, what="variance from cond")
    with pytest.raises(ValueError, match="image_cond_drop_prob"):
        unet.forward_with_cond_scale(x, time, cond_scale=3.0, image_cond_drop_prob=0.5, **batch)


# -------------------------------------------------------------------- performance options
def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = randomise_output(tiny_unet(self_attn=True))
    checkpointed = tiny_unet(self_attn=True, checkpoint_during_training=True)
    checkpointed.load_state_dict(plain.state_dict())
    batch = inputs()
    for unet in (plain, checkpointed):
        run(unet, batch).square().mean().backward()
    # The same arithmetic, except the order in which autograd sums a parameter's gradient contributions.
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert_close_to_scale(b.grad, a.grad, ulps_of_scale=NETWORK, what=name)


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
    # Looser than bf16 rounding alone: like the reference, the LayerNorms use eps 1e-3 below fp32.
    assert (out.float() - reference).abs().mean() < 0.2 * reference.abs().mean()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in unet.parameters() if p.grad is not None)


def test_with_settings_rebuilds_only_when_something_changes():
    unet = tiny_unet()
    assert unet.with_settings(channels=3, lowres_cond=False) is unet
    upsampler = unet.with_settings(lowres_cond=True)
    assert upsampler is not unet and upsampler.lowres_cond and upsampler.config["dim"] == 8


def test_cast_model_parameters_is_with_settings():
    unet = tiny_unet()
    assert (
        unet.cast_model_parameters(
            lowres_cond=False,
            lowres_noise_cond=False,
            channels=3,
            channels_out=3,
            cond_on_image_embeds=True,
            cond_on_text_encodings=True,
        )
        is unet
    )
    cast = unet.cast_model_parameters(
        lowres_cond=True,
        lowres_noise_cond=True,
        channels=3,
        channels_out=6,
        cond_on_image_embeds=False,
        cond_on_text_encodings=True,
    )
    assert cast.lowres_cond and cast.to_lowres_noise_cond is not None and cast.to_out.out_channels == 6
    assert cast.to_image_hiddens is None and isinstance(cast.image_to_tokens, torch.nn.Identity)
    with pytest.raises(TypeError, match="unknown options"):
        unet.with_settings(no_such_option=1)


# -------------------------------------------------------------------- reference behaviours pinned here
def test_output_convolution_starts_at_zero():
    unet = tiny_unet()
    assert torch.count_nonzero(run(unet, inputs())) == 0


def test_image_conditioning_reaches_levels_and_bottleneck_text_only_the_bottleneck():
    unet = randomise_output(tiny_unet(dim_mults=(1, 2, 2))).eval()
    batch = inputs()
    seen = {}

    def record(name):
        def hook(module, args, kwargs):
            seen[name] = args[2].shape[1] if len(args) > 2 else None

        return hook

    unet.downs[1][2][0].register_forward_pre_hook(record("level"), with_kwargs=True)
    unet.mid_block1.register_forward_pre_hook(record("mid"), with_kwargs=True)
    run(unet, batch)
    # num_time_tokens (2) + num_image_tokens (4) at the levels; + max_text_len (6) at the bottleneck.
    assert seen == {"level": 6, "mid": 12}
    # Without text encodings there are no text tokens at all (the null text is for dropped text only).
    run(unet, {k: v for k, v in batch.items() if k != "text_encodings"})
    assert seen == {"level": 6, "mid": 6}


def test_all_zero_text_encodings_are_padding_unless_a_text_mask_is_given():
    torch.manual_seed(0)
    unet = randomise_output(tiny_unet()).eval()
    batch = inputs(text_len=4)
    padded = batch["text_encodings"].clone()
    padded[:, 2:] = 0.0
    a = run(unet, {**batch, "text_encodings": padded})
    # Zero positions become the null text tokens, exactly as if the text were two tokens long.
    torch.testing.assert_close(a, run(unet, {**batch, "text_encodings": padded[:, :2]}), rtol=0, atol=0)
    # With a text mask (ours) the mask decides: a zero position that the mask marks valid is text.
    all_valid = torch.ones(2, 4, dtype=torch.bool)
    assert not torch.allclose(a, run(unet, {**batch, "text_encodings": padded}, text_mask=all_valid))
    with pytest.raises(ValueError, match="text_mask has shape"):
        run(unet, batch, text_mask=torch.ones(2, 3, dtype=torch.bool))


def test_text_is_ignored_by_a_unet_without_text_conditioning():
    unet = randomise_output(tiny_unet(cond_on_text_encodings=False)).eval()
    batch = inputs()
    without_text = run(unet, {k: v for k, v in batch.items() if k != "text_encodings"})
    torch.testing.assert_close(run(unet, batch), without_text, rtol=0, atol=0)


def test_image_embed_of_cond_dim_width_is_used_as_tokens():
    unet = randomise_output(tiny_unet(image_embed_dim=8, add_image_embeds_to_time=False)).eval()
    assert isinstance(unet.image_to_tokens, torch.nn.Identity)
    batch = inputs()
    embed = torch.randn(2, 8)
    vector = run(unet, {**batch, "image_embed": embed})
    tokens = run(unet, {**batch, "image_embed": embed[:, None].expand(-1, 4, -1)})
    torch.testing.assert_close(vector, tokens, rtol=0, atol=0)  # the vector is the tokens' only value
    assert not torch.allclose(vector, run(unet, {**batch, "image_embed": embed.flip(0)}))


def test_attend_at_middle_is_ignored_like_the_reference_unless_respected(monkeypatch):
    monkeypatch.setattr(_compat, "_warned", set())  # the warning is once per process
    with pytest.warns(UserWarning, match="attend_at_middle"):
        ignored = tiny_unet(attend_at_middle=False)
    assert ignored.mid_attn is not None
    assert sum(p.numel() for p in ignored.parameters()) == sum(p.numel() for p in tiny_unet().parameters())
    respected = tiny_unet(attend_at_middle=False, respect_attend_at_middle=True)
    assert respected.mid_attn is None
    assert run(randomise_output(respected), inputs()).shape == (2, 3, 8, 8)


def test_out_dim_is_ignored_like_the_reference(monkeypatch):
    monkeypatch.setattr(_compat, "_warned", set())
    with pytest.warns(UserWarning, match="out_dim"):
        unet = tiny_unet(out_dim=5)
    assert unet.channels_out == 3 and unet.to_out.out_channels == 3


def test_cross_attention_width_is_configurable():
    default = tiny_unet(cross_attn_heads=8, cross_attn_dim_head=64)
    attn = default.mid_block1.cross_attn
    assert (attn.heads, attn.to_q.out_features, attn.null_kv.shape[-1]) == (8, 512, 64)
    small = tiny_unet()
    assert small.mid_block1.cross_attn.to_q.out_features == 8
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in default.parameters())


def test_init_dim_that_the_final_block_cannot_take_is_a_clear_error():
    with pytest.raises(ValueError, match="init_dim=16"):
        tiny_unet(init_dim=16)
    with pytest.raises(ValueError, match="dim_mults\\[0\\]=2"):
        tiny_unet(dim_mults=(2, 4))


def test_lowres_inputs_given_to_the_wrong_unet_are_clear_errors():
    unet = tiny_unet()
    with pytest.raises(ValueError, match="without lowres_cond"):
        run(unet, inputs(), lowres_cond_img=torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="without lowres_noise_cond"):
        run(unet, inputs(), lowres_noise_level=torch.zeros(2))
    with pytest.raises(ValueError, match="text_embed_dim=10"):
        run(unet, {**inputs(), "text_encodings": torch.randn(2, 4, 7)})


def test_timesteps_keep_full_precision_under_bf16_autocast():
    # The reference casts t to the activation dtype; bf16 rounds 987 to 988, making them one timestep.
    torch.manual_seed(0)
    unet = randomise_output(tiny_unet()).eval()
    batch = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = run(unet, {**batch, "time": torch.tensor([987, 987])})
        b = run(unet, {**batch, "time": torch.tensor([988, 988])})
    assert torch.bfloat16 == a.dtype and not torch.equal(a, b)
