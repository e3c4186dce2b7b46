"""Every U-Net and Decoder option does something: changes the network (its parameters or what it
computes), the training loss, or the samples, as its entry in the table says.

The options are discovered from the constructor signatures, so an option added later without an
entry here fails `test_every_option_has_an_entry` with its name. Each entry: a non-default value,
the base settings it needs to matter (e.g. the percentile of dynamic thresholding needs dynamic
thresholding on), and the effect that must be seen:

- `params`: the parameter names or shapes change;
- `output`: same parameters (loaded by name), a different U-Net output;
- `loss`: same parameters, a different training loss for the same seed (for the U-Net `unet`);
- `sample`: same parameters, different samples for the same seed;
- `same`: must not change any number (e.g. gradient checkpointing), checked as equal outputs;
- `ignored`: accepted for reference configs and documented as having no effect: it must warn so.

U-Net options that only matter with another one on take it in `base` (e.g. `image_embed_dim`
needs `cond_on_image_embeds`, which the Decoder turns on for the first U-Net).
"""

from __future__ import annotations

import inspect
import warnings
import zlib
from typing import Any, Dict, NamedTuple

import pytest
import torch

from dalle2_decoder.models import Decoder, Unet, _compat

from .conftest import TINY_UNET_OPTIONS

pytestmark = pytest.mark.usefixtures("compute_threads")

EMBED = 8
TEXT = 8


class Entry(NamedTuple):
    value: Any
    effect: str
    base: Dict[str, Any] = {}
    """Settings (of the same class) both the default and the changed model get."""
    unet: int = 1
    """Decoder entries: the U-Net whose loss is compared (2 = an upsampler of a 2-U-Net cascade)."""


TEXT_UNET = {"cond_on_text_encodings": True, "text_embed_dim": TEXT}

UNET_TABLE: Dict[str, Entry] = {
    "dim": Entry(16, "params"),
    "image_embed_dim": Entry(16, "params", {"cond_on_image_embeds": True}),
    "text_embed_dim": Entry(16, "params", {"cond_on_text_encodings": True, "text_embed_dim": TEXT}),
    "cond_dim": Entry(16, "params"),
    "num_image_tokens": Entry(2, "params", {"cond_on_image_embeds": True}),
    "num_time_tokens": Entry(3, "params"),
    "out_dim": Entry(6, "ignored"),  # ignored by the reference too: channels_out is what counts
    "dim_mults": Entry((1, 2, 2), "params"),
    "channels": Entry(1, "params"),
    "channels_out": Entry(6, "params"),
    "self_attn": Entry(True, "params"),
    "attn_dim_head": Entry(8, "params"),
    "attn_heads": Entry(4, "params"),
    "lowres_cond": Entry(True, "params"),
    "lowres_noise_cond": Entry(True, "params", {"lowres_cond": True}),
    "self_cond": Entry(True, "params"),
    "sparse_attn": Entry(True, "params"),
    "cosine_sim_cross_attn": Entry(True, "output", TEXT_UNET),
    "cosine_sim_self_attn": Entry(True, "output", {"self_attn": True}),
    "attend_at_middle": Entry(False, "params", {"respect_attend_at_middle": True}),
    "respect_attend_at_middle": Entry(True, "params", {"attend_at_middle": False}),
    "cond_on_text_encodings": Entry(True, "params", {"text_embed_dim": TEXT}),
    "max_text_len": Entry(16, "params", TEXT_UNET),
    "cond_on_image_embeds": Entry(True, "params"),
    "add_image_embeds_to_time": Entry(False, "params", {"cond_on_image_embeds": True}),
    # the reference's final block only fits init_dim == dim (with dim_mults[0] == 1): nothing else builds
    "init_dim": Entry(8, "same"),
    "init_conv_kernel_size": Entry(5, "params"),
    "resnet_groups": Entry(4, "output"),
    "resnet_weight_standardization": Entry(True, "output"),
    "num_resnet_blocks": Entry(2, "params"),
    "init_cross_embed": Entry(True, "params"),
    "init_cross_embed_kernel_sizes": Entry((3, 5), "params", {"init_cross_embed": True}),
    "cross_embed_downsample": Entry(True, "params"),
    "cross_embed_downsample_kernel_sizes": Entry((2, 6), "params", {"cross_embed_downsample": True}),
    "memory_efficient": Entry(True, "params"),
    "scale_skip_connection": Entry(True, "output"),
    "pixel_shuffle_upsample": Entry(False, "params"),
    "final_conv_kernel_size": Entry(3, "params"),
    "combine_upsample_fmaps": Entry(True, "params"),
    "checkpoint_during_training": Entry(True, "same"),
    "cross_attn_heads": Entry(4, "params", TEXT_UNET),
    "cross_attn_dim_head": Entry(8, "params", TEXT_UNET),
    # 1.8.4's downsampling layers (4x4 strided convolutions); every difference of an earlier release
    # is checked against that release's own outputs in tests/test_reference_releases.py
    "reference_release": Entry("1.8.4", "params"),
}

LOWRES = {"num_unets": 2}
DECODER_TABLE: Dict[str, Entry] = {
    "unets": Entry("two U-Nets", "params"),
    "image_sizes": Entry([16], "loss"),
    "channels": Entry(1, "params"),
    "timesteps": Entry(30, "loss"),
    "sample_timesteps": Entry(4, "sample"),
    "loss_type": Entry("l1", "loss"),
    "beta_schedule": Entry("linear", "loss"),
    "learned_variance": Entry(False, "params"),
    "learned_variance_constrain_frac": Entry(True, "loss"),
    "vb_loss_weight": Entry(0.5, "loss"),
    "image_cond_drop_prob": Entry(0.9, "loss"),
    "text_cond_drop_prob": Entry(0.0, "loss", {"text": True}),
    "unconditional": Entry(True, "loss"),
    "predict_x_start": Entry(True, "loss"),
    "predict_v": Entry(True, "loss"),
    "use_noise_for_lowres_cond": Entry(True, "loss", LOWRES, unet=2),
    "use_blur_for_lowres_cond": Entry(
        False, "loss", {**LOWRES, "blur_prob": 1.0, "use_noise_for_lowres_cond": True}, unet=2
    ),
    "lowres_downsample_first": Entry(False, "loss", LOWRES, unet=2),
    "blur_prob": Entry(0.0, "loss", {**LOWRES, "blur_prob": 1.0}, unet=2),
    "blur_sigma": Entry(1.5, "loss", {**LOWRES, "blur_prob": 1.0}, unet=2),
    "blur_kernel_size": Entry(5, "loss", {**LOWRES, "blur_prob": 1.0, "blur_sigma": 1.5}, unet=2),
    "lowres_noise_sample_level": Entry(0.5, "sample", {**LOWRES, "use_noise_for_lowres_cond": True}),
    "clip_denoised": Entry(False, "sample"),
    "clip_x_start": Entry(False, "sample"),
    "use_dynamic_thres": Entry(True, "sample"),
    "dynamic_thres_percentile": Entry(0.5, "sample", {"use_dynamic_thres": True}),
    "p2_loss_weight_gamma": Entry(1.0, "loss"),
    "p2_loss_weight_k": Entry(2.0, "loss", {"p2_loss_weight_gamma": 1.0}),
    "min_snr_loss_weight": Entry(True, "loss"),
    "min_snr_gamma": Entry(1.0, "loss", {"min_snr_loss_weight": True}),
    "noise_schedule_shift": Entry(0.5, "loss"),
    "ddim_sampling_eta": Entry(1.0, "sample", {"sample_timesteps": 4}),
    "samplers": Entry("dpmpp_2m", "sample", {"sample_timesteps": 4}),
    "self_cond_prob": Entry(1.0, "loss", {"unet_self_cond": True}),
    "image_size": Entry(16, "same"),  # ignored by the reference too: image_sizes is what counts
    "random_crop_sizes": Entry([None, 8], "loss", LOWRES, unet=2),
    "vae": Entry(("a vae",), "ignored"),
    "predict_x_start_for_latent_diffusion": Entry(True, "ignored"),
    "clip_adapter_overrides": Entry({"a": 1}, "ignored"),
    "auto_normalize_img": Entry(False, "loss"),
    "image_embed_all_unets": Entry(True, "params", LOWRES),
    "vb_loss_scale_timesteps": Entry(True, "loss"),
    "vb_mean_from_objective": Entry(True, "loss", {"predict_x_start": True}),
    "self_cond_x_start": Entry(True, "loss", {"unet_self_cond": True, "self_cond_prob": 1.0}),
}


def options(cls) -> list:
    return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]


@pytest.mark.parametrize("cls, table", [(Unet, UNET_TABLE), (Decoder, DECODER_TABLE)], ids=["Unet", "Decoder"])
def test_every_option_has_an_entry(cls, table):
    missing = [name for name in options(cls) if name not in table]
    assert not missing, (
        f"{cls.__name__} options without an entry in tests/test_options_table.py: {missing}; add one saying what "
        "each changes (params, output, loss, sample), so that an option that is silently ignored is caught"
    )
    assert not [name for name in table if name not in options(cls)], "entries for options that no longer exist"


def name_seeded(module: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter values drawn from its own name, so two models with the same structure
    hold the same weights whatever their construction order (and no output layer stays at zero)."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return module


def unet_kwargs(**options) -> Dict[str, Any]:
    kwargs = dict(
        dim=8,
        image_embed_dim=EMBED,
        dim_mults=(1, 2),
        **TINY_UNET_OPTIONS,
    )
    kwargs.update(options)
    return kwargs


def build_unet(**options) -> Unet:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return name_seeded(Unet(**unet_kwargs(**options)))


def unet_output(unet: Unet, train: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.channels, 8, 8, generator=generator)
    kwargs = {"image_embed": torch.randn(2, EMBED, generator=generator)}
    if getattr(unet, "cond_on_text_encodings", False):
        kwargs["text_encodings"] = torch.randn(2, 5, TEXT, generator=generator)
    if getattr(unet, "lowres_cond", False):
        kwargs["lowres_cond_img"] = torch.randn(2, unet.channels, 8, 8, generator=generator)
        kwargs["lowres_noise_level"] = torch.tensor([3, 5])
    if getattr(unet, "self_cond", False):
        kwargs["self_cond"] = torch.randn(2, unet.channels, 8, 8, generator=generator)
    unet.train(train)
    return unet(x, torch.tensor([3, 7]), **kwargs)


def shapes(module: torch.nn.Module) -> Dict[str, tuple]:
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


@pytest.mark.parametrize("name", sorted(UNET_TABLE))
def test_unet_option_changes_what_its_entry_says(name):
    entry = UNET_TABLE[name]
    if entry.effect == "ignored":
        _compat._warned.clear()
        with pytest.warns(UserWarning, match=f"{name}=.*no effect"):
            Unet(**unet_kwargs(**{**entry.base, name: entry.value}))
        return
    base = build_unet(**entry.base)
    changed = build_unet(**{**entry.base, name: entry.value})
    if entry.effect == "params":
        assert shapes(base) != shapes(changed), f"Unet {name}={entry.value!r} does not change the parameters"
        return
    assert shapes(base) == shapes(changed), f"Unet {name}={entry.value!r} changes the parameters; say 'params'"
    train = entry.effect == "same"
    a, b = unet_output(base, train), unet_output(changed, train)
    if entry.effect == "same":
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"Unet {name} must not change any number")
    else:
        assert not torch.allclose(a, b, rtol=0, atol=1e-6), f"Unet {name}={entry.value!r} is ignored: same output"


def build_decoder(**options) -> Decoder:
    options = dict(options)
    num_unets = options.pop("num_unets", 1)
    text = options.pop("text", False)
    unet_options = {"self_cond": True} if options.pop("unet_self_cond", False) else {}
    if text:
        unet_options.update(TEXT_UNET)
    if options.get("unconditional"):
        unet_options["image_embed_dim"] = None
    if options.get("channels"):
        unet_options["channels"] = options["channels"]
    if options.pop("unets", None):
        num_unets = 2
    unets = [Unet(**unet_kwargs(lowres_cond=index > 0, **unet_options)) for index in range(num_unets)]
    kwargs = dict(image_sizes=[8, 16][:num_unets], timesteps=25)  # linear schedules need more than 20
    kwargs.update(options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return name_seeded(Decoder(unets, **kwargs))


def decoder_loss(decoder: Decoder, unet: int, text: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(3, decoder.channels, 16, 16, generator=generator)
    embed = None if decoder.unconditional else torch.randn(3, EMBED, generator=generator)
    encodings = torch.randn(3, 5, TEXT, generator=generator) if text else None
    torch.manual_seed(2)
    decoder.train()
    return decoder(images, embed, encodings, unet_number=unet)


def decoder_sample(decoder: Decoder) -> torch.Tensor:
    embed = torch.randn(2, EMBED, generator=torch.Generator().manual_seed(3))
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    if len(decoder.unets) == 2:
        return decoder.sample(image_embed=embed, image=images, start_at_unet_number=2, seed=5)
    return decoder.sample(image_embed=embed, seed=5)


@pytest.mark.parametrize("name", sorted(DECODER_TABLE))
def test_decoder_option_changes_what_its_entry_says(name):
    entry = DECODER_TABLE[name]
    if entry.effect == "ignored":
        _compat._warned.clear()
        with pytest.warns(UserWarning, match=f"{name}=.*no effect"):
            Decoder([Unet(**unet_kwargs())], image_sizes=[8], **{name: entry.value})
        return
    value = {"unets": True}.get(name, entry.value)
    base = build_decoder(**entry.base)
    changed = build_decoder(**{**entry.base, name: value})
    if entry.effect == "params":
        assert shapes(base) != shapes(changed), f"Decoder {name}={entry.value!r} does not change the parameters"
        return
    if entry.effect in ("loss", "same"):
        text = bool(entry.base.get("text"))
        same_structure = shapes(base) == shapes(changed)
        a, b = decoder_loss(base, entry.unet, text), decoder_loss(changed, entry.unet, text)
        if entry.effect == "same":
            assert same_structure and torch.equal(a, b), f"Decoder {name} must not change any number"
            return
        assert not same_structure or not torch.allclose(a, b, rtol=0, atol=1e-7), (
            f"Decoder {name}={entry.value!r} is ignored: same loss ({float(a):.6f})"
        )
        return
    a, b = decoder_sample(base), decoder_sample(changed)
    assert not torch.allclose(a, b, rtol=0, atol=1e-6), f"Decoder {name}={entry.value!r} is ignored: same samples"
