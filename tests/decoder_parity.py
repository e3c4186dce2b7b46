"""Replays the decoder reference fixtures (tests/fixtures/reference/decoder/) on this package's Decoder.

Shared by tests/test_reference_parity_decoder.py and bench/reference_parity.py. The fixtures were
written by scripts/reference_fixtures/decoder_cases.py from DALLE2-pytorch 1.15.6; the reference
is not needed here. Both decoders run the same closed-form stand-in network
(scripts/reference_fixtures/standin_network.py), so differences come from the decoder alone.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
from typing import Any, Dict, List

import torch
from safetensors.torch import load_file

from dalle2_decoder.models import Decoder, Unet
from dalle2_decoder.models.decoder import ReplayedNoise, TrainingDraws
from dalle2_decoder.models.reference_names import decoder_state_from_reference
from tests.numerics import NETWORK

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "reference" / "decoder"
REAL = " (reference U-Nets)"
KINDS = (
    "training loss",
    "DDPM step",
    "DDIM step",
    "sampled images",
    "inpainted images",
    "training loss" + REAL,
    "sampled images" + REAL,
    "inpainted images" + REAL,
)

ULPS_OF_SCALE = NETWORK
"""How far each output kind may be from the reference's, in ulps of its scale (max |reference| of the
kind, tests/numerics.py). With the stand-in network, a few float32 roundings per step: up to ~50
ulps of scale measured, on every kernel path and thread count of `make test-portability` (the
largest where the first steps of a short schedule turn the network's output into x_0, which
divides it by sqrt(alpha_bar_t): sqrt((1 - alpha_bar) / alpha_bar) is 123 at the first step of a
6-step cosine schedule); 2**8 leaves ~5x and fails any change of 3e-5 of the scale."""
REAL_UNETS_FACTOR = 2**3
"""The kinds computed end to end by real U-Nets ("(reference U-Nets)") carry the U-Net's own
rounding (up to ~30 ulps of scale, tests/reference_parity.py), amplified by the same first steps:
up to ~240 ulps of scale measured (guided 6-step DDPM)."""


def allowed_ulps(kind: str) -> float:
    """How far outputs of `kind` may be from the reference's, in ulps of their scale."""
    return ULPS_OF_SCALE * (REAL_UNETS_FACTOR if kind.endswith(REAL) else 1)


def _load_script(name: str):
    path = ROOT / "scripts" / "reference_fixtures" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_reference_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


standin_network = _load_script("standin_network")
synthetic_state = _load_script("synthetic_weights").synthetic_state


def case_names() -> List[str]:
    return sorted(path.stem for path in FIXTURES.glob("*.json"))


def load_case(name: str) -> tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    return meta, load_file(str(FIXTURES / f"{name}.safetensors"))


def build_decoder(meta: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> Decoder:
    """Our Decoder with the case's options: its U-Nets compute the stand-in network, or are ours
    with the reference's initial weights (mapped from its Decoder state dict) or synthetic ones."""
    unets = []
    for options in meta["unets"]:
        kwargs = dict(dim=8, dim_mults=(1,), image_embed_dim=meta["embed_dim"], text_embed_dim=meta["text_dim"])
        kwargs.update(options)
        unets.append(Unet(**kwargs))
    decoder = Decoder(unets, **meta["decoder"])
    if meta["network"] == "init":
        reference_state = {key[len("state.") :]: value for key, value in tensors.items() if key.startswith("state.")}
        decoder.load_state_dict(decoder_state_from_reference(reference_state), strict=True)
        return decoder
    if meta["network"] == "synthetic":
        for index, unet in enumerate(decoder.unets):
            shapes = [(name, tuple(t.shape)) for name, t in unet.state_dict().items()]
            unet.load_state_dict(synthetic_state(shapes, meta["seed"] + index), strict=True)
        return decoder
    for index, unet in enumerate(decoder.unets):
        prefix = f"standin.{index}."
        coefficients = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        standin_network.install(unet, coefficients)
    return decoder


def _max_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    if ours.shape != theirs.shape:
        raise AssertionError(f"shape {tuple(ours.shape)} != reference {tuple(theirs.shape)}")
    return float((ours.double() - theirs.double()).abs().max())


def compare_case(name: str, scales: Dict[str, float] | None = None) -> Dict[str, float]:
    """Largest absolute difference from the reference per output kind for one case.

    scales, when given, receives the largest reference magnitude per kind (for judging the differences).
    """
    scales = {} if scales is None else scales

    def note(kind: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
        diffs[kind] = max(diffs.get(kind, 0.0), _max_diff(ours, theirs))
        scales[kind] = max(scales.get(kind, 0.0), float(theirs.abs().max()))

    meta, tensors = load_case(name)
    decoder = build_decoder(meta, tensors)
    image = tensors["image"]
    image_embed = tensors.get("image_embed")
    text = tensors.get("text_encodings")
    diffs: Dict[str, float] = {}
    suffix = "" if meta["network"] == "standin" else REAL

    decoder.train()
    for number, recorded in enumerate(meta["train"], start=1):
        key = f"train.{number}."
        draws = TrainingDraws(
            times=tensors[key + "times"],
            noise=tensors[key + "noise"],
            lowres_noise_level=tensors.get(key + "lowres_noise_level"),
            lowres_noise=tensors.get(key + "lowres_noise"),
            blur=tuple(recorded["blur"]) if "blur" in recorded else None,
            self_cond=recorded.get("self_cond"),
        )
        loss = decoder(image, image_embed, text, unet_number=number, draws=draws)
        note("training loss" + suffix, loss.detach().reshape(1), tensors[key + "loss"])

    for unet in decoder.unets:
        getattr(unet, "standin_trace", []).clear()
    noise = ReplayedNoise([tensors[f"sample.noise.{i:04d}"] for i in range(meta["sample_noise_count"])])
    kwargs = dict(meta["sample"])
    inpainting = "inpaint_mask" in tensors
    if inpainting:
        kwargs.update(inpaint_image=image, inpaint_mask=tensors["inpaint_mask"].bool())
    if meta.get("sample_image"):
        kwargs["image"] = image
    images = decoder.sample(image_embed, text, noise=noise, **kwargs)
    if noise.used != len(noise.tensors):
        raise AssertionError(
            f"{name}: sampling used {noise.used} noise tensors, the reference drew {len(noise.tensors)}"
        )
    note(("inpainted images" if inpainting else "sampled images") + suffix, images, tensors["sample.images"])
    if suffix:
        return diffs

    # Every network input of the chain (each is the previous step's output) against the reference's.
    for index, unet in enumerate(decoder.unets):
        count = meta["trace_counts"][index]
        if len(unet.standin_trace) != count:
            raise AssertionError(
                f"{name}: U-Net {index + 1} was called {len(unet.standin_trace)} times, the reference {count}"
            )
        steps = decoder.sample_timesteps[index]
        kind = "DDPM step" if steps is None else "DDIM step"
        for call, (x, t) in enumerate(unet.standin_trace):
            reference_t = tensors[f"sample.trace.{index}.{call:04d}.t"]
            if not torch.equal(t, reference_t):
                raise AssertionError(
                    f"{name}: U-Net {index + 1} call {call} at timesteps {t.tolist()}, "
                    f"the reference at {reference_t.tolist()}"
                )
            note(kind, x, tensors[f"sample.trace.{index}.{call:04d}.x"])
    return diffs
