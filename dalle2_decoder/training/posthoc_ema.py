"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, section 3): power-function EMA profiles kept during training, their snapshots, and
the least-squares fit that makes the EMA of any length from those snapshots after training.

A power-function EMA with exponent gamma averages the weights theta_1, theta_2, ... of the
optimizer steps applied so far (EDM2 eq. 3):

    theta_hat_t = beta(t) * theta_hat_{t-1} + (1 - beta(t)) * theta_t,  beta(t) = (1 - 1/t) ** (gamma + 1)

(t from 1; beta(1) = 0 copies the weights). Unrolled, the product of the betas from tau + 1 to t
telescopes to (tau / t) ** (gamma + 1), so the snapshot at t weighs theta_tau exactly by

    w_t(tau) = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / t ** (gamma + 1),  tau = 1 .. t,

which sums to 1: the discrete form of the density (gamma + 1) tau ** gamma / t ** (gamma + 1). The
length of a profile is its relative standard deviation, the standard deviation of tau under that
density divided by t. With the moments E[tau] = t (g + 1) / (g + 2) and E[tau^2] = t^2 (g + 1) / (g + 3):

    sigma_rel ** 2 = (g + 1) / (g + 3) - (g + 1) ** 2 / (g + 2) ** 2 = (g + 1) / ((g + 2) ** 2 (g + 3)),

which falls from 12 ** -0.5 (about 0.289) at g = 0 towards 0 as g grows: each sigma_rel below that
has one exponent g > 0 (`gamma_from_sigma_rel` finds it by bisection).

After training, the EMA with another sigma_rel at step T is approximated by a combination
sum_i x_i * snapshot_i: the x_i minimise the L2 distance over tau between the target's weights
w_T(tau) and sum_i x_i w_{t_i}(tau) (EDM2 section 3.2; here over the exact discrete weights above),
subject to sum_i x_i = 1 (EDM2 leaves the sum free). Its error is sum_tau r(tau) theta_tau with r
the residual of that fit, so at most ||r||_1 * max_tau |theta_tau - theta_ref| + |theta_ref| *
|sum_tau r(tau)| for any theta_ref, and the constraint makes sum_tau r(tau) = sum_i x_i - 1 = 0.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..common.files import atomic_write
from ..failures import EXIT_CHECKPOINT
from ..tracking.run_state import POSTHOC_EMA_FOLDER
from .ema import average_into

SNAPSHOT_FORMAT = "dalle2_decoder.posthoc_ema/1"
SNAPSHOT_FOLDER = POSTHOC_EMA_FOLDER
"""Snapshots are written here, under `tracker.data_path` (a tracker entry: `overwrite_data_path` clears it)."""
_CHUNK = 1 << 18
"""Steps of the time axis handled at once by the fit: memory stays O(chunk x snapshots) for any run length."""


def sigma_rel_of_gamma(gamma: float) -> float:
    """Relative standard deviation of the power-function profile with exponent `gamma` (module docstring)."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent gamma > 0 whose profile has relative standard deviation `sigma_rel` (in (0, 12 ** -0.5))."""
    if not 0.0 < sigma_rel < sigma_rel_of_gamma(0.0):
        raise ValueError(f"sigma_rel must be in (0, {sigma_rel_of_gamma(0.0):.4f}), got {sigma_rel}")
    low, high = 0.0, 1.0
    while sigma_rel_of_gamma(high) > sigma_rel:  # sigma_rel falls monotonically for gamma >= 0
        low, high = high, high * 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if sigma_rel_of_gamma(middle) > sigma_rel:
            low = middle
        else:
            high = middle
        if high - low <= 4 * np.finfo(np.float64).eps * high:
            break
    return (low + high) / 2.0


def profile_weights(taus: np.ndarray, *, gamma: float, start: int, count: int) -> np.ndarray:
    """w(tau) of a profile begun after update `start` and updated `count` times since, at the global
    update numbers `taus` (from 1); 0 outside start + 1 .. start + count.

    Written as (s / c) ** (g + 1) * (1 - (1 - 1 / s) ** (g + 1)) with s = tau - start, c = count, so
    that neither power overflows nor the difference cancels for long runs and large exponents."""
    s = taus.astype(np.float64) - start
    inside = (s >= 1) & (s <= count)
    s = np.where(inside, s, 2.0)  # any s >= 2 keeps the logarithms finite; masked below
    exponent = gamma + 1.0
    weights = np.exp(exponent * np.log(s / count)) * -np.expm1(exponent * np.log1p(-1.0 / np.maximum(s, 2.0)))
    # s = 1 (the update that began the profile): the bracket is 1, as (s - 1) ** (g + 1) is 0.
    weights = np.where(s == 1.0, (1.0 / count) ** exponent, weights)
    return np.where(inside, weights, 0.0)


@dataclass(frozen=True)
class Profile:
    """One weighting profile over the global EMA updates: a snapshot's, or the target's."""

    gamma: float
    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count

    def weights(self, taus: np.ndarray) -> np.ndarray:
        return profile_weights(taus, gamma=self.gamma, start=self.start, count=self.count)


@dataclass(frozen=True)
class Fit:
    coefficients: np.ndarray
    """x_i of each snapshot, in the order given."""
    residual_l1: float
    """||sum_i x_i w_i - w_target||_1 over the time axis."""
    residual_sum: float
    """sum_tau of that residual: sum_i x_i - 1, as each profile sums to 1."""


def fit_profiles(snapshots: Sequence[Profile], target: Profile) -> Fit:
    """The least-squares coefficients of `snapshots` whose combined weights best match `target`'s."""
    if not snapshots:
        raise ValueError("no snapshots to reconstruct from")
    horizon = max([target.end] + [p.end for p in snapshots])
    size = len(snapshots)
    gram = np.zeros((size, size))
    right = np.zeros(size)
    for first in range(1, horizon + 1, _CHUNK):
        taus = np.arange(first, min(first + _CHUNK, horizon + 1))
        basis = _basis(snapshots, taus)
        gram += basis @ basis.T
        right += basis @ target.weights(taus)
    # Least squares with sum_i x_i = 1 (Lagrange multiplier in the last row): the combination is then
    # a weighted average of the weights seen, as an EMA is, so its error does not grow with the
    # weights' magnitude but only with how far they moved (the bound in the module docstring).
    system = np.zeros((size + 1, size + 1))
    system[:size, :size] = gram
    system[:size, size] = system[size, :size] = 1.0
    coefficients = np.linalg.lstsq(system, np.append(right, 1.0), rcond=None)[0][:size]
    l1 = total = 0.0
    for first in range(1, horizon + 1, _CHUNK):
        taus = np.arange(first, min(first + _CHUNK, horizon + 1))
        basis = _basis(snapshots, taus)
        residual = coefficients @ basis - target.weights(taus)
        l1 += float(np.abs(residual).sum())
        total += float(residual.sum())
    return Fit(coefficients=coefficients, residual_l1=l1, residual_sum=total)


def _basis(profiles: Sequence[Profile], taus: np.ndarray) -> np.ndarray:
    """Each profile's weights at `taus` (consecutive), one row each; a profile that ended before the
    chunk (most, late in a long run) is zeros without evaluating it."""
    basis = np.zeros((len(profiles), len(taus)))
    for row, profile in enumerate(profiles):
        if profile.end >= taus[0] and profile.start < taus[-1]:
            basis[row] = profile.weights(taus)
    return basis


# --- during training -------------------------------------------------------------------------------


class PowerEMA(nn.Module):
    """A frozen copy of a network averaged with a power-function profile (EDM2 eq. 3).

    `start`: the global EMA update count when this profile began (0 unless it was added on a resume);
    `num_updates`: its own updates since. Both are saved, so a resumed run continues the profile."""

    def __init__(self, network: nn.Module, sigma_rel: float, *, start: int = 0):
        super().__init__()
        self.sigma_rel = float(sigma_rel)
        self.gamma = gamma_from_sigma_rel(self.sigma_rel)
        self.averaged = copy.deepcopy(network).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("start", torch.tensor(int(start), dtype=torch.long))
        self._count: Optional[int] = 0

    def train(self, mode: bool = True) -> "PowerEMA":
        return super().train(False)  # the average is only ever used for inference

    @property
    def count(self) -> int:
        if self._count is None:  # read back once after loading, not every step
            self._count = int(self.num_updates)
        return self._count

    def profile(self) -> Profile:
        return Profile(gamma=self.gamma, start=int(self.start), count=self.count)

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        t = self.count + 1
        self.num_updates += 1
        self._count = t
        beta = (1.0 - 1.0 / t) ** (self.gamma + 1.0)  # 0 at t = 1: a copy
        weight = 1.0 - beta
        source = dict(network.named_parameters())
        averaged = [p for _, p in self.averaged.named_parameters()]
        new = [source[name].detach() for name, _ in self.averaged.named_parameters()]
        average_into(averaged, new, beta)
        buffers = dict(network.named_buffers())
        for name, buffer in self.averaged.named_buffers():
            if buffer.is_floating_point():
                buffer.lerp_(buffers[name].to(buffer.dtype), weight)
            else:
                buffer.copy_(buffers[name])

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._count = None


def _sigma_key(sigma_rel: float) -> str:
    return repr(float(sigma_rel))


class PosthocEMA:
    """The power-function profiles of each trained U-Net, and their snapshots.

    `update` is called after each optimizer step applied (as the EMA's); every `every_n_steps`
    updates, each profile's average of every U-Net is written to `folder` (one safetensors file per
    profile and snapshot, atomically). `folder` is None where nothing is written (processes other
    than the main one; set by the training loop once the tracker knows its data path).
    """

    def __init__(self, unets: Dict[int, nn.Module], sigma_rels: Sequence[float], every_n_steps: int):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.every_n_steps = int(every_n_steps)
        self.profiles: Dict[int, Dict[str, PowerEMA]] = {
            number: {_sigma_key(s): PowerEMA(unet, s) for s in self.sigma_rels} for number, unet in unets.items()
        }
        self.updates = 0
        """EMA updates since post-hoc EMA began (optimizer steps applied; skipped non-finite ones do not count)."""
        self.folder: Optional[Path] = None
        self.config_json: Optional[str] = None

    @torch.no_grad()
    def update(self, unets: Dict[int, nn.Module]) -> None:
        self.updates += 1
        for number, profiles in self.profiles.items():
            for ema in profiles.values():
                ema.update(unets[number])
        if self.updates % self.every_n_steps == 0:
            self.write_snapshots()

    def write_snapshots(self) -> List[Path]:
        """One file per profile holding its average of every trained U-Net (`unets.{i}.` names)."""
        if self.folder is None:
            return []
        written = []
        for key in self.profiles[next(iter(self.profiles))]:
            tensors: Dict[str, torch.Tensor] = {}
            for number, profiles in self.profiles.items():
                ema = profiles[key]
                for name, tensor in ema.averaged.state_dict().items():
                    tensors[f"unets.{number - 1}.{name}"] = tensor.detach().to("cpu").contiguous().clone()
            first = self.profiles[next(iter(self.profiles))][key]
            metadata = {
                "format": SNAPSHOT_FORMAT,
                "updates": str(self.updates),
                "sigma_rel": key,
                "gamma": repr(first.gamma),
                "start": str(int(first.start)),
                "count": str(first.count),
                "unets": json.dumps(sorted(self.profiles)),
            }
            if self.config_json is not None:
                metadata["config"] = self.config_json
            path = self.folder / snapshot_name(self.updates, key)
            written.append(atomic_write(path, lambda temp, t=tensors, m=metadata: _save(t, temp, m)))
        return written

    def state_dict(self) -> Dict[str, Any]:
        return {
            "updates": self.updates,
            "profiles": {
                str(number): {key: ema.state_dict() for key, ema in profiles.items()}
                for number, profiles in self.profiles.items()
            },
        }

    def load_state_dict(self, state: Optional[Dict[str, Any]], unets: Dict[int, nn.Module]) -> List[str]:
        """Continue the saved profiles; a profile or U-Net the checkpoint lacks starts now (said in a note)."""
        notes = []
        if not state:
            self.updates = 0
            notes.append(
                "post-hoc EMA: the checkpoint has no profiles; they start at this step "
                "(snapshots count their updates from here)"
            )
            for number, profiles in self.profiles.items():
                for key in list(profiles):
                    profiles[key] = _moved_like(PowerEMA(unets[number], float(key), start=0), profiles[key])
            return notes
        self.updates = int(state.get("updates", 0))
        saved = state.get("profiles", {})
        for number, profiles in self.profiles.items():
            for key in list(profiles):
                entry = saved.get(str(number), {}).get(key)
                if entry is None:
                    profiles[key] = _moved_like(PowerEMA(unets[number], float(key), start=self.updates), profiles[key])
                    notes.append(
                        f"post-hoc EMA: U-Net {number}'s profile sigma_rel={key} is not in the checkpoint; it starts "
                        f"after update {self.updates}"
                    )
                else:
                    profiles[key].load_state_dict(entry)
        return notes


def _moved_like(new: PowerEMA, old: PowerEMA) -> PowerEMA:
    """`new` on the device and in the dtype of `old` (both copies of the same U-Net)."""
    reference = next(iter(old.averaged.parameters()), None)
    return new.to(reference.device) if reference is not None else new


def _save(tensors: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def snapshot_name(updates: int, sigma_key: str) -> str:
    return f"{updates:010d}-sigma_rel-{sigma_key}.safetensors"


_NAME = re.compile(r"^\d{10}-sigma_rel-[0-9.e-]+\.safetensors$")


@dataclass(frozen=True)
class Snapshot:
    """A snapshot file and what its metadata says."""

    path: Path
    updates: int
    sigma_rel: float
    profile: Profile
    unets: Tuple[int, ...]
    config_json: Optional[str]


class SnapshotError(RuntimeError):
    """The snapshots cannot be read or used; the message names the file or folder."""

    exit_status: ClassVar[int] = EXIT_CHECKPOINT


def read_snapshot_info(path: Path) -> Snapshot:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own kinds for damaged files
        raise SnapshotError(f"{path}: not a readable safetensors file ({error})") from error
    if metadata.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError(f"{path}: not a post-hoc EMA snapshot (format {metadata.get('format')!r})")
    try:
        profile = Profile(gamma=float(metadata["gamma"]), start=int(metadata["start"]), count=int(metadata["count"]))
        return Snapshot(
            path=path,
            updates=int(metadata["updates"]),
            sigma_rel=float(metadata["sigma_rel"]),
            profile=profile,
            unets=tuple(int(n) for n in json.loads(metadata["unets"])),
            config_json=metadata.get("config"),
        )
    except (KeyError, ValueError, TypeError) as error:
        raise SnapshotError(f"{path}: damaged snapshot metadata ({error})") from error


def list_snapshots(folder: Path) -> List[Snapshot]:
    """The snapshots in `folder` (a run's `posthoc_ema/`), by update then sigma_rel."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SnapshotError(f"{folder}: no such folder of post-hoc EMA snapshots")
    found = [read_snapshot_info(path) for path in sorted(folder.iterdir()) if _NAME.match(path.name)]
    return sorted(found, key=lambda s: (s.updates, s.sigma_rel))


def combine_snapshots(snapshots: Sequence[Snapshot], coefficients: Sequence[float]) -> Dict[str, torch.Tensor]:
    """sum_i x_i * snapshot_i, accumulated in float64 and returned in each tensor's own dtype."""
    from safetensors.torch import load_file

    total: Dict[str, torch.Tensor] = {}
    dtypes: Dict[str, torch.dtype] = {}
    for snapshot, coefficient in zip(snapshots, coefficients):
        for name, tensor in load_file(str(snapshot.path)).items():
            dtypes.setdefault(name, tensor.dtype)
            if not tensor.is_floating_point():
                total[name] = tensor  # integer buffers (counters): the latest snapshot's
                continue
            term = tensor.to(torch.float64) * float(coefficient)
            total[name] = total[name] + term if name in total else term
    return {name: tensor.to(dtypes[name]) for name, tensor in total.items()}
