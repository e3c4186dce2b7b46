"""Deterministic weights for reference-parity fixtures, computed the same way on both sides.

The reference's initial weights are mostly unhelpful for a parity check (its output convolution
starts at zero, so every output is 0), and storing trained-looking weights for dozens of cases
would take megabytes (every cross-attention block has 8 x 64 wide heads). So most fixture cases
store only a seed: the generator fills the reference's U-Net with these values and the test
fills ours with the same ones, parameter by parameter in sorted name order (our names equal the
reference's). Plain torch, no import of either package, so both interpreters can run it.
"""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch


def synthetic_state(shapes: Iterable[Tuple[str, Tuple[int, ...]]], seed: int) -> Dict[str, torch.Tensor]:
    """name -> fp32 tensor: weights ~ N(0, 1 / fan_in), gains 1 + N(0, 0.1^2), biases and embeddings N(0, 0.2^2).

    The output convolution (`to_out.weight`, `to_out.bias`) gets a quarter of that, so that
    predictions are O(1) like those of a trained eps-predicting U-Net; at larger outputs, fp32
    rounding alone (one ulp of the weights) moves the reference's own outputs by ~1e-5.
    """
    state = {}
    for index, (name, shape) in enumerate(sorted(shapes)):
        g = torch.Generator().manual_seed(seed * 100_003 + index)
        values = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        if leaf == "g" or (leaf == "weight" and len(shape) == 1):  # norm gains
            values = 1 + 0.1 * values
        elif len(shape) >= 2 and not leaf.startswith("null"):
            values = values * fan_in**-0.5
        else:
            values = values * 0.2
        if name.startswith("to_out."):
            values = values * 0.25
        state[name] = values
    return state
