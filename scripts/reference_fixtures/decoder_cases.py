"""Decoder parity fixtures: DALLE2-pytorch 1.15.6's `Decoder` on fixed inputs and random draws.

Run through generate.py with /work/refvenv/bin/python (dalle2-pytorch 1.15.6 installed); writes
tests/fixtures/reference/decoder/: one `<case>.json` (the decoder and U-Net options, what was
run) and one `<case>.safetensors` per case (inputs, the random draws the reference made, its
outputs).

Most cases install the same closed-form stand-in network (standin_network.py) on the
reference's U-Nets, so the fixtures pin the decoder itself (schedules, losses, conditioning,
DDPM / DDIM / inpainting loops, guidance) whatever the U-Net architecture. The `unets_*` cases
run the reference's real (tiny) U-Nets end to end: with its initial weights (stored, the whole
reference Decoder state dict) or with synthetic weights from a seed (synthetic_weights.py). Random draws are
recorded by wrapping torch's and Python's random functions while the reference runs:
- training: timesteps, low-res augmentation level and noise, the target noise, the blur and
  self-conditioning coin flips (Python's `random`, scripted to a fixed value per case);
- sampling: every Gaussian tensor drawn, in order (our `Decoder.sample(noise=...)` replays them),
  and the input of every network call (`trace_*`), so each DDPM / DDIM step is compared.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import random
import sys
from typing import Any, Dict, List

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import standin_network  # noqa: E402
from synthetic_weights import synthetic_state  # noqa: E402

BATCH = 2
CHANNELS = 3
EMBED = 6
TEXT_LEN, TEXT_DIM = 3, 5

# name -> (decoder options, per-U-Net options, training coin value, sampling call options)
CASES: Dict[str, Dict[str, Any]] = {
    # Reference defaults (learned variance on U-Net 1 only, cosine then linear, blur), DDPM.
    "defaults_ddpm": dict(
        decoder=dict(image_sizes=[4, 8], timesteps=25, image_cond_drop_prob=0.0, text_cond_drop_prob=0.0),
        unets=[{}, {}],
        coin=0.3,
        sample=dict(),
        train_times=[[24, 3], [0, 24]],
    ),
    # x_0 objective, l1, learned variance on both (constrained), p2 weighting, blur range, no blur drawn.
    "x0_l1_p2_ddpm": dict(
        decoder=dict(
            image_sizes=[4, 8],
            timesteps=8,
            beta_schedule="cosine",
            predict_x_start=True,
            loss_type="l1",
            learned_variance=[True, True],
            learned_variance_constrain_frac=True,
            p2_loss_weight_gamma=[1.0, 0.5],
            p2_loss_weight_k=2,
            blur_sigma=[0.4, 0.8],
            blur_kernel_size=[3, 5],
            vb_loss_weight=0.01,
            image_cond_drop_prob=0.0,
            text_cond_drop_prob=0.0,
        ),
        unets=[{}, {}],
        coin=0.7,
        sample=dict(),
    ),
    # v objective, huber, quadratic/sigmoid schedules, noise augmentation only (per-upsampler lists),
    # dynamic thresholding, blur range drawn, DDIM with eta.
    "v_huber_noise_ddim": dict(
        decoder=dict(
            image_sizes=[4, 8],
            timesteps=25,
            predict_v=True,
            loss_type="huber",
            beta_schedule=["quadratic", "sigmoid"],
            learned_variance=[True],
            use_noise_for_lowres_cond=[True],
            use_blur_for_lowres_cond=[False],
            use_dynamic_thres=True,
            dynamic_thres_percentile=0.9,
            lowres_noise_sample_level=0.3,
            sample_timesteps=[3, 4],
            ddim_sampling_eta=0.5,
            image_cond_drop_prob=0.0,
            text_cond_drop_prob=0.0,
        ),
        unets=[{}, {}],
        coin=0.3,
        sample=dict(),
    ),
    # Guidance (per-U-Net cond_scale), text conditioning, self-conditioning, noise and blur, jsd in DDIM.
    "guidance_text_selfcond_ddim": dict(
        decoder=dict(
            image_sizes=[4, 8],
            timesteps=8,
            beta_schedule=["jsd", "cosine"],
            learned_variance=False,
            use_noise_for_lowres_cond=True,
            blur_sigma=0.5,
            sample_timesteps=3,
            ddim_sampling_eta=1.0,
            image_cond_drop_prob=1.0,
            text_cond_drop_prob=1.0,
        ),
        unets=[dict(cond_on_text_encodings=True, self_cond=True), dict(cond_on_text_encodings=True, self_cond=True)],
        coin=0.2,
        sample=dict(cond_scale=[2.0, 1.5]),
        text=True,
        train_times=[[1, 5], [0, 6]],
    ),
    # Guidance through DDPM with learned variance and self-conditioning on U-Net 1.
    "guidance_learned_variance_ddpm": dict(
        decoder=dict(
            image_sizes=[4, 8],
            timesteps=8,
            beta_schedule=["cosine", "cosine"],
            image_cond_drop_prob=1.0,
            text_cond_drop_prob=0.0,
        ),
        unets=[dict(self_cond=True), {}],
        coin=0.6,
        sample=dict(cond_scale=3.0),
        train_times=[[0, 7], [7, 0]],
    ),
    # Unconditional, images in [-1, 1] (no normalisation), no downsampling first, noise and blur.
    "unconditional_unnormalized": dict(
        decoder=dict(
            image_sizes=[4, 8],
            timesteps=25,
            unconditional=True,
            auto_normalize_img=False,
            lowres_downsample_first=False,
            use_noise_for_lowres_cond=[False, True],
            blur_prob=1.0,
            blur_kernel_size=5,
            blur_sigma=1.2,
            beta_schedule="linear",
            sample_timesteps=[None, 5],
        ),
        unets=[dict(image_embed_dim=None), dict(image_embed_dim=None)],
        coin=0.9,
        sample=dict(batch_size=BATCH),
    ),
    # Sampling from the upsampler on (a nearest-resized copy of) a given image, and stopping there.
    "start_at_upsampler": dict(
        decoder=dict(
            image_sizes=[4, 8, 16],
            timesteps=6,
            beta_schedule="cosine",
            sample_timesteps=[None, 3, 2],
            use_noise_for_lowres_cond=[True, False],
            image_cond_drop_prob=0.0,
            text_cond_drop_prob=0.0,
        ),
        unets=[{}, {}, {}],
        coin=0.3,
        sample=dict(start_at_unet_number=2, stop_at_unet_number=2, image=True),
        train_times=[[1, 2], [3, 4], [5, 0]],
    ),
    # Inpainting with resampling, DDPM then DDIM.
    "inpaint_ddpm": dict(
        decoder=dict(
            image_sizes=[4, 8], timesteps=6, beta_schedule="cosine", image_cond_drop_prob=0.0, text_cond_drop_prob=0.0
        ),
        unets=[{}, {}],
        coin=0.3,
        sample=dict(inpaint=True, inpaint_resample_times=2),
    ),
    "inpaint_ddim": dict(
        decoder=dict(
            image_sizes=[4, 8],
            timesteps=25,
            sample_timesteps=[4, 3],
            ddim_sampling_eta=0.3,
            predict_x_start=True,
            image_cond_drop_prob=0.0,
            text_cond_drop_prob=0.0,
        ),
        unets=[{}, {}],
        coin=0.3,
        sample=dict(inpaint=True, inpaint_resample_times=3),
    ),
    # Note: DALLE2-pytorch's linear / quadratic / sigmoid schedules scale their betas by 1000 / T, so
    # they need T > 20 (betas above 1 otherwise); cases using them run 25 steps.
    # A single U-Net with every schedule default and the reference's default timesteps count.
    "single_unet_t1000_ddim": dict(
        decoder=dict(image_sizes=[8], sample_timesteps=4, image_cond_drop_prob=0.0, text_cond_drop_prob=0.0),
        unets=[{}],
        coin=0.3,
        sample=dict(),
        train_times=[[0, 999]],
    ),
}


# End to end: the reference's real U-Nets (tiny), its initial weights stored in one case and
# deterministic synthetic weights (a seed, see synthetic_weights.py) in the others.
REAL_UNET = dict(
    dim=8,
    dim_mults=(1, 2),
    image_embed_dim=EMBED,
    text_embed_dim=TEXT_DIM,
    cond_dim=8,
    attn_heads=2,
    attn_dim_head=4,
    num_resnet_blocks=1,
    init_cross_embed=False,
    init_conv_kernel_size=3,
)
CASES.update(
    {
        "unets_reference_init": dict(
            # One resolution level (the reference's 8 x 64 cross-attention below the top level would
            # make the stored weights megabytes); default schedules and learned variance.
            network="init",
            decoder=dict(
                image_sizes=[8, 16],
                timesteps=25,
                sample_timesteps=[3, 2],
                image_cond_drop_prob=0.0,
                text_cond_drop_prob=0.0,
            ),
            unets=[dict(REAL_UNET, dim_mults=(1,)), dict(REAL_UNET, dim_mults=(1,))],
            coin=0.3,
            sample=dict(),
        ),
        # Few steps: guidance and the x_0 estimate at large t amplify fp32 rounding (batching the
        # conditional and null passes alone moves a 12-step chain by ~2e-5), so a short chain keeps
        # the comparison at the 1e-5 tolerance meaningful.
        "unets_synthetic_guidance_text_ddpm": dict(
            network="synthetic",
            decoder=dict(
                image_sizes=[8, 16],
                timesteps=6,
                beta_schedule="cosine",
                use_noise_for_lowres_cond=True,
                image_cond_drop_prob=1.0,
                text_cond_drop_prob=1.0,
                learned_variance=[True, True],
            ),
            unets=[
                dict(REAL_UNET, cond_on_text_encodings=True, self_cond=True),
                dict(REAL_UNET, cond_on_text_encodings=True),
            ],
            coin=0.3,
            sample=dict(cond_scale=[1.5, 1.25]),
            text=True,
        ),
        "unets_synthetic_inpaint_ddim": dict(
            network="synthetic",
            decoder=dict(
                image_sizes=[8, 16],
                timesteps=25,
                predict_v=True,
                sample_timesteps=[4, 3],
                ddim_sampling_eta=0.5,
                image_cond_drop_prob=0.0,
                text_cond_drop_prob=0.0,
            ),
            unets=[dict(REAL_UNET), dict(REAL_UNET, self_cond=True)],
            coin=0.4,
            sample=dict(inpaint=True, inpaint_resample_times=2),
        ),
    }
)


class Recorder:
    """Wraps torch's and Python's random functions: records tensors, scripts Python's coin flips."""

    def __init__(self, coin: float, forced_times: List[int] | None = None):
        self.coin = coin
        self.forced_times = forced_times
        self.events: List[tuple] = []

    @contextlib.contextmanager
    def active(self):
        originals = (torch.randn, torch.randn_like, torch.randint, random.random, random.uniform, random.randrange)
        o_randn, o_randn_like, o_randint, _, o_uniform, o_randrange = originals

        def randn(*args, **kwargs):
            out = o_randn(*args, **kwargs)
            self.events.append(("normal", out.clone()))
            return out

        def randn_like(*args, **kwargs):
            out = o_randn_like(*args, **kwargs)
            self.events.append(("normal", out.clone()))
            return out

        def randint(*args, **kwargs):
            out = o_randint(*args, **kwargs)
            if self.forced_times is not None and not any(e[0] == "int" for e in self.events):
                out = torch.tensor(self.forced_times, dtype=out.dtype)
            self.events.append(("int", out.clone()))
            return out

        def coin():
            self.events.append(("coin", self.coin))
            return self.coin

        def uniform(a, b):
            out = o_uniform(a, b)
            self.events.append(("uniform", out))
            return out

        def randrange(a, b):
            out = o_randrange(a, b)
            self.events.append(("randrange", out))
            return out

        torch.randn, torch.randn_like, torch.randint = randn, randn_like, randint
        random.random, random.uniform, random.randrange = coin, uniform, randrange
        try:
            yield self
        finally:
            torch.randn, torch.randn_like, torch.randint, random.random, random.uniform, random.randrange = originals

    def of(self, kind: str) -> list:
        return [value for k, value in self.events if k == kind]


def _build(case: Dict[str, Any], seed: int):
    from dalle2_pytorch import Decoder, Unet

    options = dict(case["decoder"])
    unets = []
    for unet_options in case["unets"]:
        kwargs = dict(
            dim=8,
            dim_mults=(1,),
            image_embed_dim=EMBED,
            text_embed_dim=TEXT_DIM,
            attn_heads=2,
            attn_dim_head=4,
            init_cross_embed=False,
        )
        kwargs.update(unet_options)
        unets.append(Unet(**kwargs))
    decoder = Decoder(unet=tuple(unets), **options)
    coefficients = {}
    network = case.get("network", "standin")
    if network == "synthetic":
        for index, unet in enumerate(decoder.unets):
            shapes = [(name, tuple(t.shape)) for name, t in unet.state_dict().items()]
            unet.load_state_dict(synthetic_state(shapes, seed + index), strict=True)
    if network != "standin":
        return decoder, coefficients
    for index, unet in enumerate(decoder.unets):
        out_channels = CHANNELS * (2 if decoder.learned_variance[index] else 1)
        coefficients[index] = standin_network.make_coefficients(CHANNELS, out_channels, seed + index)
        # The reference's own forward_with_cond_scale runs (it calls the installed forward).
        standin_network.install(unet, coefficients[index], with_cond_scale=False)
    return decoder, coefficients


def _run_case(name: str, case: Dict[str, Any], seed: int) -> tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    decoder, coefficients = _build(case, seed)
    unconditional = case["decoder"].get("unconditional", False)
    normalized = case["decoder"].get("auto_normalize_img", True)
    size = case["decoder"]["image_sizes"][-1]
    g = torch.Generator().manual_seed(seed)
    tensors: Dict[str, torch.Tensor] = {}
    image = torch.rand(BATCH, CHANNELS, size, size, generator=g)
    # Saturated pixels (exactly 0 and 1), so the edge bins of the discretised likelihood are used.
    image[..., 0, : size // 2] = 0.0
    image[..., 0, size // 2 :] = 1.0
    if not normalized:
        image = image * 2 - 1
    tensors["image"] = image
    image_embed = None if unconditional else torch.randn(BATCH, EMBED, generator=g)
    text = torch.randn(BATCH, TEXT_LEN, TEXT_DIM, generator=g) if case.get("text") else None
    if image_embed is not None:
        tensors["image_embed"] = image_embed
    if text is not None:
        tensors["text_encodings"] = text
    for index, coeffs in coefficients.items():
        for key, value in coeffs.items():
            tensors[f"standin.{index}.{key}"] = value
    network = case.get("network", "standin")
    if network == "init":
        for key, value in decoder.state_dict().items():
            tensors[f"state.{key}"] = value.detach().clone()
    meta: Dict[str, Any] = {
        "case": name,
        "network": network,
        "seed": seed,
        "decoder": case["decoder"],
        "unets": case["unets"],
        "batch": BATCH,
        "channels": CHANNELS,
        "embed_dim": EMBED,
        "text_dim": TEXT_DIM,
        "sample": {k: v for k, v in case["sample"].items() if k not in ("inpaint", "image")},
        "sample_image": bool(case["sample"].get("image")),
        "train": [],
    }

    # ---- training loss per U-Net, with the draws recorded
    decoder.train()
    num_unets = len(case["unets"])
    for number in range(1, num_unets + 1):
        forced = case.get("train_times", [None] * num_unets)[number - 1]
        recorder = Recorder(case["coin"], forced)
        with recorder.active():
            loss = decoder(image, image_embed=image_embed, text_encodings=text, unet_number=number)
        ints, normals, coins = recorder.of("int"), recorder.of("normal"), recorder.of("coin")
        uniforms, ranges = recorder.of("uniform"), recorder.of("randrange")
        lowres = decoder.lowres_conds[number - 1]
        draws: Dict[str, Any] = {}
        tensors[f"train.{number}.times"] = ints[0]
        coin_index = 0
        if lowres is not None and lowres.use_blur:
            blurred = coins[0] < lowres.blur_prob
            coin_index = 1
            sigma = uniforms[0] if uniforms else lowres.blur_sigma
            kernel = ranges[0] if ranges else lowres.blur_kernel_size
            draws["blur"] = [bool(blurred), float(sigma) if blurred else 0.0, int(kernel) if blurred else 0]
        if lowres is not None and lowres.use_noise:
            tensors[f"train.{number}.lowres_noise_level"] = ints[1]
            tensors[f"train.{number}.lowres_noise"] = normals[0]
            normals = normals[1:]
        tensors[f"train.{number}.noise"] = normals[0]
        if decoder.unets[number - 1].self_cond:
            draws["self_cond"] = bool(coins[coin_index] < 0.5)
        tensors[f"train.{number}.loss"] = loss.detach().reshape(1)
        meta["train"].append(draws)

    # ---- sampling, every Gaussian draw and every network input recorded
    for unet in decoder.unets:
        getattr(unet, "standin_trace", []).clear()
    sample_kwargs = dict(case["sample"])
    inpaint = sample_kwargs.pop("inpaint", False)
    if sample_kwargs.pop("image", False):
        sample_kwargs["image"] = image
    if inpaint:
        mask = torch.zeros(BATCH, size, size, dtype=torch.bool)
        mask[:, : size // 2, :] = True
        mask[1, :, : size // 4] = True
        sample_kwargs.update(inpaint_image=image, inpaint_mask=mask)
        tensors["inpaint_mask"] = mask.to(torch.uint8)
    recorder = Recorder(case["coin"])
    with recorder.active():
        torch.manual_seed(seed + 100)
        images = decoder.sample(image_embed=image_embed, text_encodings=text, **sample_kwargs)
    normals = recorder.of("normal")
    meta["sample_noise_count"] = len(normals)
    for i, tensor in enumerate(normals):
        tensors[f"sample.noise.{i:04d}"] = tensor
    for index, unet in enumerate(decoder.unets):
        trace = getattr(unet, "standin_trace", [])
        meta.setdefault("trace_counts", []).append(len(trace))
        for call, (x, t) in enumerate(trace):
            tensors[f"sample.trace.{index}.{call:04d}.x"] = x
            tensors[f"sample.trace.{index}.{call:04d}.t"] = t
    tensors["sample.images"] = images
    return meta, {k: v.contiguous() for k, v in tensors.items()}


def generate(out_dir: pathlib.Path) -> None:
    """Write every case into out_dir (tests/fixtures/reference/decoder/ through generate.py)."""
    target = pathlib.Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    for old in list(target.glob("*.json")) + list(target.glob("*.safetensors")):
        old.unlink()
    for seed, (name, case) in enumerate(sorted(CASES.items())):
        meta, tensors = _run_case(name, case, 1000 + 17 * seed)
        (target / f"{name}.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        save_file(tensors, str(target / f"{name}.safetensors"))
        print(f"decoder/{name}: {len(tensors)} tensors, {meta['sample_noise_count']} sampling noise draws")
