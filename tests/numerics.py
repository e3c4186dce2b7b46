"""Comparing computed numbers with tolerances derived from float32 rounding, relative to their scale.

Two float32 computations of the same formula agree bit for bit only when the same kernels add the
same terms in the same order. Another CPU (PyTorch, MKL and oneDNN pick their kernels by the
processor: `ATEN_CPU_CAPABILITY`), another thread count (threads split reductions), another batch
size or another implementation (the reference, diffusers) rounds differently. Each rounding errs by
at most eps32 / 2 of the value it produces, so differences are measured in units of
eps32 * scale, where scale is the largest magnitude among the values compared (the expected ones):
"ulps of scale". A bound of k ulps of scale says how many such roundings, and how much
amplification by the computation, the comparison allows; each caller writes beside its k why.

Exact comparisons (`torch.equal`, `rtol=0, atol=0`) stay where equality holds by construction: a
round trip through a file, or the same computation twice in one process on the same thread count.

`make test-portability` runs the numerical tests on every kernel path and thread count; the
closest any comparison came to its bound is printed at the end of each pytest run
(`pytest_terminal_summary` in conftest.py), and with DALLE2_NUMERICS_LOG=FILE every comparison
appends a JSON line (what, error, scale, ulps of scale, bound) to FILE, for choosing a bound.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Tuple, Union

import torch

EPS32 = torch.finfo(torch.float32).eps
"""2**-23: the gap between 1.0 and the next float32; one rounding errs by at most half of it, relatively."""

Numbers = Union[torch.Tensor, float, int]

FEW_ROUNDINGS = 2**4
"""A formula of a few float32 operations evaluated in another order or another precision (ours and a
hand-written one, say): each operation errs by at most eps32 / 2 of its result, and a sum of terms
that partly cancel by the ratio of the terms to the sum; 16 ulps of scale allows a handful of
operations and a cancellation of a few times."""

NETWORK = 2**8
"""A float32 network (the U-Net, the Decoder's steps around it) evaluated with its arithmetic in
another order: another kernel path or thread count, another batch size or input shape, or another
implementation of the same layers. Every layer rounds; the parity fixtures (tests/reference_parity.py)
measure up to ~30 ulps of scale at the output, on every kernel path and thread count of `make
test-portability`, for well-conditioned networks; 2**8 leaves ~10x and still fails any change of
the outputs by 3e-5 of their scale."""

_closest: Optional[Tuple[float, str]] = None
_count = 0


def _as_float64(values: Numbers) -> torch.Tensor:
    return torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64)


def scale_of(values: Numbers) -> float:
    """The largest magnitude in `values` (0.0 for an empty tensor)."""
    values = _as_float64(values)
    return float(values.abs().max()) if values.numel() else 0.0


def scale_of_combination(*terms: Tuple[float, Numbers]) -> float:
    """The scale of sum(c * t) for terms (c, t), as far as rounding goes: sum(|c| * max |t|). Errors
    of k ulps in each t's own scale are at most k ulps of this scale in the combination (a guided
    prediction null + s * (cond - null) = (1 - s) * null + s * cond, say)."""
    return sum(abs(coefficient) * scale_of(values) for coefficient, values in terms)


def max_error(actual: Numbers, expected: Numbers) -> float:
    """The largest |actual - expected|, computed in float64; shapes must be equal."""
    actual, expected = _as_float64(actual), _as_float64(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    return float((actual - expected).abs().max()) if actual.numel() else 0.0


def bound_for(scale: float, ulps_of_scale: float) -> float:
    """The tolerance `ulps_of_scale` ulps of `scale` stands for: ulps_of_scale * eps32 * scale."""
    return ulps_of_scale * EPS32 * scale


def check_error(error: float, scale: float, *, ulps_of_scale: float, what: str = "") -> Optional[str]:
    """None when error <= ulps_of_scale * eps32 * scale, else a message saying by how much it is over.
    For callers that reduce many comparisons to one largest error and one scale themselves."""
    global _closest, _count
    bound = bound_for(scale, ulps_of_scale)
    ratio = error / bound if bound > 0 else (0.0 if error == 0 else float("inf"))
    ulps = error / (EPS32 * scale) if scale > 0 else (0.0 if error == 0 else float("inf"))
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    _count += 1
    if _closest is None or ratio > _closest[0]:
        _closest = (ratio, " in ".join(part for part in (what, test) if part) or "(unnamed)")
    if os.environ.get("DALLE2_NUMERICS_LOG"):
        with open(os.environ["DALLE2_NUMERICS_LOG"], "a") as log:
            entry = dict(test=test, what=what, error=error, scale=scale, ulps=ulps, bound=ulps_of_scale, ratio=ratio)
            log.write(json.dumps(entry) + "\n")
    if error <= bound:
        return None
    return (
        f"{what + ': ' if what else ''}max |actual - expected| = {error:.3g} > {bound:.3g} = "
        f"{ulps_of_scale:g} x eps32 x scale {scale:.3g} (the error is {ulps:.3g} ulps of scale)"
    )


def check_close_to_scale(
    actual: Numbers, expected: Numbers, *, ulps_of_scale: float, what: str = "", scale: Optional[float] = None
) -> Optional[str]:
    """None when every |actual - expected| <= ulps_of_scale * eps32 * scale, else the message saying
    by how much it is over. `scale` defaults to the largest |expected|; pass it when the expected
    values come from larger ones (a difference of two large numbers, say)."""
    scale = scale_of(expected) if scale is None else scale
    return check_error(max_error(actual, expected), scale, ulps_of_scale=ulps_of_scale, what=what)


def assert_close_to_scale(
    actual: Numbers, expected: Numbers, *, ulps_of_scale: float, what: str = "", scale: Optional[float] = None
) -> None:
    """Assert |actual - expected| <= ulps_of_scale * eps32 * scale everywhere (see `check_close_to_scale`)."""
    problem = check_close_to_scale(actual, expected, ulps_of_scale=ulps_of_scale, what=what, scale=scale)
    assert problem is None, problem


def closest_to_bound() -> Tuple[int, Optional[Tuple[float, str]]]:
    """How many scale-relative comparisons ran in this process, and the largest error / bound among them."""
    return _count, _closest


def add_counts(count: int, closest: Optional[Tuple[float, str]]) -> None:
    """Count in comparisons made in another process (a pytest-xdist worker's, reported to the controller)."""
    global _closest, _count
    _count += count
    if closest is not None and (_closest is None or closest[0] > _closest[0]):
        _closest = (float(closest[0]), str(closest[1]))
