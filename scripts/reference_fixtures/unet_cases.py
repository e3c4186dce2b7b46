"""U-Net parity cases: every option of DALLE2-pytorch 1.15.6's `Unet`, tiny, with the reference's outputs.

For each case, `tests/fixtures/reference/unet/<case>.json` holds the constructor kwargs, the
reference's parameter count, where the weights come from and the calls made; `<case>.safetensors`
holds the inputs (`in.*`), the outputs (`out.*`) and, for cases with stored weights, the state
dict (`state.*`). Most cases use `synthetic_weights.synthetic_state(seed)` instead of stored
weights (see that module for why); the `stored_*` cases keep the reference's own initial weights
(with the zero-initialised output convolution given values, so outputs are not all zero).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import torch
from safetensors.torch import save_file
from synthetic_weights import synthetic_state

EMBED, TEXT, SIZE, BATCH = 12, 10, 8, 2

# Shared by all cases unless overridden: small enough that the whole folder stays well under 1.5 MB.
BASE: Dict[str, Any] = dict(
    dim=8,
    dim_mults=[1, 2],
    image_embed_dim=EMBED,
    cond_dim=8,
    num_resnet_blocks=1,
    attn_heads=2,
    attn_dim_head=4,
    max_text_len=6,
    cond_on_image_embeds=True,
)

# name -> (kwargs over BASE, options of the case)
CASES: Dict[str, tuple] = {
    "base_image_and_text": (dict(cond_on_text_encodings=True, text_embed_dim=TEXT), dict(text_len=4)),
    "text_longer_than_max_text_len": (
        dict(cond_on_text_encodings=True, text_embed_dim=TEXT, max_text_len=3),
        dict(text_len=5),
    ),
    "image_tokens_only_no_time_add": (dict(add_image_embeds_to_time=False, num_image_tokens=3, num_time_tokens=3), {}),
    "unconditional": (dict(cond_on_image_embeds=False), dict(image_embed=None)),
    "image_embed_dim_equals_cond_dim": (
        dict(image_embed_dim=8, add_image_embeds_to_time=False, num_image_tokens=4),
        dict(image_embed="tokens"),
    ),
    "image_embed_vector_as_tokens_batch_of_one": (dict(image_embed_dim=8), dict(batch=1)),
    "upsampler_noise_cond_learned_variance": (
        dict(
            lowres_cond=True,
            lowres_noise_cond=True,
            channels_out=6,
            cond_on_image_embeds=False,
            cond_on_text_encodings=True,
            text_embed_dim=TEXT,
        ),
        dict(lowres=True, noise_level=True, text_len=4, image_embed=None),
    ),
    "upsampler_blur_only_one_channel": (dict(lowres_cond=True, channels=1), dict(lowres=True)),
    "self_cond": (
        dict(self_cond=True, lowres_cond=True, lowres_noise_cond=True),
        dict(self_cond=True, lowres=True, noise_level=True),
    ),
    "memory_efficient_lists": (
        dict(memory_efficient=True, num_resnet_blocks=[1, 2], resnet_groups=[4, 8], self_attn=[False, True]),
        dict(size=8),
    ),
    "cross_embed_downsample_nearest_upsample": (
        dict(
            cross_embed_downsample=True,
            cross_embed_downsample_kernel_sizes=[2, 4, 6],
            pixel_shuffle_upsample=False,
            init_cross_embed_kernel_sizes=[3, 5],
        ),
        {},
    ),
    "weight_standardization_plain_init_conv": (
        dict(
            resnet_weight_standardization=True,
            init_cross_embed=False,
            init_conv_kernel_size=5,
            final_conv_kernel_size=3,
            out_dim=5,
            init_dim=8,
        ),
        {},
    ),
    "sparse_attn_three_levels": (dict(sparse_attn=True, dim_mults=[1, 2, 2], self_attn=[False, True, False]), {}),
    "cosine_sim_attention": (
        dict(
            cosine_sim_self_attn=True,
            cosine_sim_cross_attn=True,
            self_attn=[False, True],
            cond_on_text_encodings=True,
            attn_dim_head=16,
            text_embed_dim=TEXT,
        ),
        dict(text_len=4),
    ),
    "combine_fmaps_scale_skip": (
        dict(combine_upsample_fmaps=True, scale_skip_connection=True, dim_mults=[1, 2, 4]),
        {},
    ),
    "combine_fmaps_memory_efficient": (
        dict(combine_upsample_fmaps=True, memory_efficient=True, pixel_shuffle_upsample=False, attend_at_middle=False),
        {},
    ),
    "checkpoint_during_training": (
        dict(
            checkpoint_during_training=True, self_attn=[False, True], cond_on_text_encodings=True, text_embed_dim=TEXT
        ),
        dict(train_mode=True, text_len=4),
    ),
    "memory_efficient_cross_embed_sparse_weight_standardized": (
        dict(
            memory_efficient=True,
            cross_embed_downsample=True,
            sparse_attn=True,
            resnet_weight_standardization=True,
            lowres_cond=True,
            lowres_noise_cond=True,
        ),
        dict(lowres=True, noise_level=True),
    ),
    "four_levels_reference_attention_defaults": (
        dict(
            dim_mults=[1, 1, 2, 2],
            num_resnet_blocks=2,
            attn_heads=16,
            attn_dim_head=32,
            self_attn=[False, False, True, True],
            cond_on_text_encodings=True,
            text_embed_dim=TEXT,
            max_text_len=8,
        ),
        dict(text_len=8),
    ),
    "stored_reference_init": (
        dict(
            dim_mults=[1],
            cond_on_text_encodings=True,
            text_embed_dim=TEXT,
            self_attn=True,
            max_text_len=4,
            init_cross_embed_kernel_sizes=[3, 5],
        ),
        dict(weights="stored", text_len=3),
    ),
}

# Calls made on every case: output name -> forward arguments besides the inputs.
CALLS: Dict[str, Dict[str, Any]] = {
    "keep_all": dict(method="forward", image_cond_drop_prob=0.0, text_cond_drop_prob=0.0),
    "drop_all": dict(method="forward", image_cond_drop_prob=1.0, text_cond_drop_prob=1.0),
    "drop_image": dict(method="forward", image_cond_drop_prob=1.0, text_cond_drop_prob=0.0),
    "drop_text": dict(method="forward", image_cond_drop_prob=0.0, text_cond_drop_prob=1.0),
    "guided": dict(method="forward_with_cond_scale", cond_scale=2.0),
}


def make_inputs(options: Dict[str, Any], kwargs: Dict[str, Any], seed: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = options.get("size", SIZE)
    batch = options.get("batch", BATCH)
    channels = kwargs.get("channels", 3)
    inputs = {
        "x": torch.randn(batch, channels, size, size, generator=g),
        # Fractional and large timesteps: the embedding must match where the arguments are ~1000.
        "time": torch.tensor([3.0, 987.0])[:batch],
    }
    image_embed = options.get("image_embed", "vector")
    if image_embed == "vector":
        inputs["image_embed"] = torch.randn(batch, kwargs["image_embed_dim"], generator=g)
    elif image_embed == "tokens":
        inputs["image_embed"] = torch.randn(batch, kwargs["num_image_tokens"], kwargs["cond_dim"], generator=g)
    if "text_len" in options:
        text = torch.randn(batch, options["text_len"], TEXT, generator=g)
        text[0, -2:] = 0.0  # padding positions of sample 0 (all-zero encodings, the reference's padding rule)
        inputs["text_encodings"] = text
    if options.get("lowres"):
        inputs["lowres_cond_img"] = torch.randn(batch, channels, size, size, generator=g).clamp(-1, 1)
    if options.get("noise_level"):
        inputs["lowres_noise_level"] = torch.tensor([0.0, 123.0])[:batch]
    if options.get("self_cond"):
        inputs["self_cond"] = torch.randn(batch, channels, size, size, generator=g).clamp(-1, 1)
    return inputs


def run_call(unet, inputs: Dict[str, torch.Tensor], call: Dict[str, Any], train_mode: bool) -> torch.Tensor:
    args = {k: v for k, v in inputs.items() if k not in ("x", "time")}
    args.setdefault("image_embed", None)  # a required keyword of the reference's forward
    x, time = inputs["x"], inputs["time"]
    if train_mode:
        x = x.clone().requires_grad_(True)  # checkpointing is skipped when nothing needs a gradient
    with torch.set_grad_enabled(train_mode):
        if call["method"] == "forward":
            out = unet(
                x,
                time,
                image_cond_drop_prob=call["image_cond_drop_prob"],
                text_cond_drop_prob=call["text_cond_drop_prob"],
                **args,
            )
        else:
            out = unet.forward_with_cond_scale(x, time, cond_scale=call["cond_scale"], **args)
    return out.detach().contiguous()


def generate(out_dir: Path) -> None:
    from dalle2_pytorch.dalle2_pytorch import Unet

    for old in list(out_dir.glob("*.json")) + list(out_dir.glob("*.safetensors")):
        old.unlink()
    index: List[str] = []
    for case_number, (name, (overrides, options)) in enumerate(CASES.items()):
        kwargs = {**BASE, **overrides}
        torch.manual_seed(case_number)
        unet = Unet(**kwargs)
        state = unet.state_dict()
        tensors: Dict[str, torch.Tensor] = {}
        if options.get("weights") == "stored":
            with torch.no_grad():
                g = torch.Generator().manual_seed(case_number)
                unet.to_out.weight.normal_(0.0, 0.1, generator=g)
                unet.to_out.bias.normal_(0.0, 0.1, generator=g)
            weights = {"kind": "stored"}
            tensors.update({f"state.{k}": v.detach().clone().contiguous() for k, v in unet.state_dict().items()})
        else:
            seed = 1000 + case_number
            unet.load_state_dict(synthetic_state([(k, tuple(v.shape)) for k, v in state.items()], seed))
            weights = {"kind": "synthetic", "seed": seed}
        train_mode = bool(options.get("train_mode", False))
        unet.train(train_mode)

        inputs = make_inputs(options, kwargs, seed=10 + case_number)
        tensors.update({f"in.{k}": v.contiguous() for k, v in inputs.items()})
        calls = dict(CALLS)
        if options.get("self_cond"):
            calls["keep_all_no_self_cond"] = dict(CALLS["keep_all"], omit=["self_cond"])
        for out_name, call in calls.items():
            call_inputs = {k: v for k, v in inputs.items() if k not in call.get("omit", [])}
            tensors[f"out.{out_name}"] = run_call(unet, call_inputs, call, train_mode)

        meta = {
            "case": name,
            "config": kwargs,
            "param_count": sum(p.numel() for p in unet.parameters()),
            "state_shapes": {k: list(v.shape) for k, v in sorted(state.items())},
            "weights": weights,
            "train_mode": train_mode,
            "calls": calls,
        }
        (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        save_file(tensors, str(out_dir / f"{name}.safetensors"), metadata={"case": name})
        index.append(name)
    (out_dir / "index.json").write_text(
        json.dumps({"generator": "dalle2-pytorch 1.15.6", "cases": index}, indent=1) + "\n"
    )
