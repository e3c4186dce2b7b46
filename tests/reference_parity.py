"""Replaying the reference-parity fixtures (tests/fixtures/reference/) on our modules.

Shared by tests/test_reference_parity_unet.py and bench/reference_parity.py. Needs neither the
reference nor network: weights are stored in the fixture or rebuilt from its seed with
scripts/reference_fixtures/synthetic_weights.py (the generator's own code, plain torch).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import torch
from safetensors.torch import load_file

from dalle2_decoder.models import Unet
from dalle2_decoder.models.reference_names import unet_state_from_reference
from tests.numerics import NETWORK

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "reference"
UNET_FIXTURES = FIXTURES / "unet"

ULPS_OF_SCALE = NETWORK
"""Ours and the reference each round at every one of the U-Net's 20-60 layers (reductions of up to a
few hundred terms, in orders that depend on the kernels and the thread count): outputs differ by up
to ~30 ulps of their scale (max |reference output|) on the kernel paths and thread counts of `make
test-portability`; 2**8 (tests/numerics.py: NETWORK) leaves ~10x for paths not seen there and
still fails any change of the outputs by 3e-5 of their scale (scaling them by 1 + 1e-3 is ~8400
ulps)."""
CONDITION = {"four_levels_reference_attention_defaults": 2**3}
"""Fixtures whose computation amplifies rounding errors, with the factor allowed. four_levels: at
1x1 resolution, GroupNorm's groups hold 2 values (16 channels in 8 groups); in mid_block1 they
agree to 1e-3 of their size, and dividing by their spread multiplies the errors before it by ~1000
(attenuated by the later layers: up to ~200 ulps of scale measured at the output)."""


def allowed_ulps(name: str) -> float:
    """How far case `name`'s outputs may be from the reference's, in ulps of their scale (tests/numerics.py)."""
    return ULPS_OF_SCALE * CONDITION.get(name, 1)


def _synthetic_state_fn():
    path = REPO / "scripts" / "reference_fixtures" / "synthetic_weights.py"
    spec = importlib.util.spec_from_file_location("_reference_synthetic_weights", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module.synthetic_state


@dataclass
class UnetCase:
    name: str
    meta: Dict[str, Any]
    tensors: Dict[str, torch.Tensor]

    @property
    def inputs(self) -> Dict[str, torch.Tensor]:
        return {k[3:]: v for k, v in self.tensors.items() if k.startswith("in.")}

    @property
    def outputs(self) -> Dict[str, torch.Tensor]:
        return {k[4:]: v for k, v in self.tensors.items() if k.startswith("out.")}

    def reference_state(self) -> Dict[str, torch.Tensor]:
        """The reference U-Net's state dict, under the reference's names."""
        weights = self.meta["weights"]
        if weights["kind"] == "stored":
            return {k[6:]: v for k, v in self.tensors.items() if k.startswith("state.")}
        shapes = {k: tuple(v) for k, v in self.meta["state_shapes"].items()}
        return _synthetic_state_fn()(shapes.items(), weights["seed"])

    def build(self) -> Unet:
        return Unet(**self.meta["config"])

    def loaded(self) -> Unet:
        unet = self.build()
        unet.load_state_dict(unet_state_from_reference(self.reference_state()), strict=True)
        unet.train(self.meta["train_mode"])
        return unet

    def run(self, unet: Unet, output: str) -> torch.Tensor:
        call = self.meta["calls"][output]
        inputs = {k: v for k, v in self.inputs.items() if k not in call.get("omit", [])}
        x, time = inputs.pop("x"), inputs.pop("time")
        train = self.meta["train_mode"]
        if train:
            x = x.clone().requires_grad_(True)
        with torch.set_grad_enabled(train):
            if call["method"] == "forward":
                out = unet(
                    x,
                    time,
                    image_cond_drop_prob=call["image_cond_drop_prob"],
                    text_cond_drop_prob=call["text_cond_drop_prob"],
                    **inputs,
                )
            else:
                out = unet.forward_with_cond_scale(x, time, cond_scale=call["cond_scale"], **inputs)
        return out.detach()


def unet_case_names() -> List[str]:
    return json.loads((UNET_FIXTURES / "index.json").read_text())["cases"]


def load_unet_case(name: str) -> UnetCase:
    meta = json.loads((UNET_FIXTURES / f"{name}.json").read_text())
    return UnetCase(name, meta, load_file(str(UNET_FIXTURES / f"{name}.safetensors")))


def unet_max_differences() -> Dict[str, float]:
    """case/output -> largest absolute difference between our output and the reference's."""
    diffs = {}
    for name in unet_case_names():
        case = load_unet_case(name)
        unet = case.loaded()
        for output, expected in case.outputs.items():
            diffs[f"{name}/{output}"] = (case.run(unet, output) - expected).abs().max().item()
    return diffs
