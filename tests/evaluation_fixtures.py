"""Tiny TorchScript feature networks and fixed images for the evaluation tests.

Run as a script (under `accelerate launch`), it computes the metrics on a fixed set of images
split unevenly across the ranks and writes rank 0's values as JSON: see test_evaluation_distributed.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

IMAGE_SIZE = 16
FEATURE_DIM = 6
CLASSES = 5


class TinyFeatures(nn.Module):
    """Images as floats in [0, 1] -> `dim` features (fixed random weights)."""

    def __init__(self, dim: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, dim, 3, stride=2, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.conv1(images * 2 - 1))
        return self.scale * self.conv2(hidden).mean(dim=(2, 3))


class TinyLpipsNet(nn.Module):
    """Images in [-1, 1] -> two feature maps, as an LPIPS backbone."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        first = torch.relu(self.conv1(images))
        return [first, torch.relu(self.conv2(first))]


def write_networks(folder: Path) -> Dict[str, str]:
    """TorchScript files: `features` (FID/KID), `logits` (IS), `lpips` (LPIPS net_type)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(11)
    paths = {}
    for name, module in (
        ("features", TinyFeatures(FEATURE_DIM)),
        ("logits", TinyFeatures(CLASSES, scale=20.0)),
        ("lpips", TinyLpipsNet()),
    ):
        path = folder / f"{name}.pt"
        torch.jit.script(module.eval()).save(str(path))
        paths[name] = str(path)
    return paths


def metric_options(paths: Dict[str, str], *, subset_size: int = 8, splits: int = 2) -> Dict[str, Dict]:
    return {
        "FID": {"feature": paths["features"], "normalize": True},
        "IS": {"feature": paths["logits"], "normalize": True, "splits": splits},
        "KID": {"feature": paths["features"], "normalize": True, "subsets": 5, "subset_size": subset_size},
        "LPIPS": {"net_type": paths["lpips"], "normalize": True},
    }


def fixed_images(count: int, seed: int = 5) -> Tuple[torch.Tensor, torch.Tensor]:
    """Real images and imperfect "reconstructions" of them, in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    real = torch.rand(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    noise = torch.rand(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    generated = (0.6 * real + 0.4 * noise) ** 1.3
    return real, generated


METRIC_ULPS = 2**6
"""How far a metric may move when the same images are fed in other batches or spread over processes,
in ulps of its scale (`metric_scales`): the features are computed image by image, so another
batching changes each by at most a few roundings (FEW_ROUNDINGS, tests/numerics.py), which KID's
cubic kernel triples: 4 x 16."""


def trace_sqrt_product(s1, s2) -> float:
    """tr((S1 S2)^1/2) for covariance matrices S1, S2 (numpy, float64), by another route than
    torchmetrics' (the eigenvalues of S1 S2): S1 S2 has the eigenvalues of the symmetric
    S1^1/2 S2 S1^1/2, whose square roots are summed; both roots come from symmetric eigensolvers,
    with rounding's tiny negative eigenvalues of the positive semi-definite matrices taken as 0."""
    import numpy as np

    values, vectors = np.linalg.eigh(s1)
    root1 = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    middle = root1 @ s2 @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum())


def metric_scales(paths: Dict[str, str], real: torch.Tensor, generated: torch.Tensor) -> Dict[str, float]:
    """For each metric value, the size of the terms it is computed from, which its rounding is
    relative to. FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2) and KID (an MMD: the
    kernel means of real, generated and cross pairs) are differences of terms that nearly cancel
    for similar image sets: KID is ~1e-3 of its terms here. IS and LPIPS are averages of positive
    values; IS_std a spread of scores of IS_mean's size."""
    import numpy as np

    def features(images: torch.Tensor) -> np.ndarray:
        network = torch.jit.load(paths["features"])
        with torch.no_grad():
            return network((images.clamp(0, 1) * 255).round() / 255).double().numpy()

    x, y = features(real), features(generated)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    fid_terms = float(
        ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) + 2 * trace_sqrt_product(s1, s2)
    )

    def kernel_mean(a: np.ndarray, b: np.ndarray) -> float:  # KID's default: (a.b / dim + 1)^3
        return float(np.abs((a @ b.T / a.shape[1] + 1.0) ** 3).mean())

    kid_terms = kernel_mean(x, x) + kernel_mean(y, y) + 2 * kernel_mean(x, y)
    return {"eval/FID": fid_terms, "eval/KID_mean": kid_terms, "eval/KID_std": kid_terms}


def assert_metrics_close(got: Dict[str, float], expected: Dict[str, float], scales: Dict[str, float]) -> None:
    """Every metric of `expected` in `got`, within METRIC_ULPS of its scale: `scales` (metric_scales)
    for FID and KID, IS_mean's size for IS_std, the value itself for the others."""
    from tests.numerics import check_close_to_scale

    problems = []
    for key, value in expected.items():
        scale = scales.get(key, abs(expected["eval/IS_mean"]) if key == "eval/IS_std" else abs(value))
        problems.append(check_close_to_scale(got[key], value, ulps_of_scale=METRIC_ULPS, scale=scale, what=key))
    problems = [problem for problem in problems if problem]
    assert not problems, "\n".join(problems)


def _distributed_main(out_path: str, networks: str, count: int) -> None:
    from accelerate import Accelerator

    from dalle2_decoder.evaluation import MetricSuite
    from dalle2_decoder.evaluation.metrics import pooled_count

    state = Accelerator(cpu=True)
    paths = json.loads(networks)
    suite = MetricSuite(metric_options(paths), device=state.device, image_size=IMAGE_SIZE)
    real, generated = fixed_images(count)
    # Uneven shares (rank 0 gets more) fed in different batch sizes, so ranks differ in update counts.
    split = count // 2 + 3
    mine = slice(0, split) if state.process_index == 0 else slice(split, count)
    batch = 4 if state.process_index == 0 else 3
    real, generated = real[mine], generated[mine]
    for start in range(0, real.shape[0], batch):
        suite.update(real[start : start + batch], generated[start : start + batch])

    values = suite.compute(seed=3)
    values["samples"] = pooled_count(real.shape[0], state)
    values["world_size"] = state.num_processes
    values["distributed"] = torch.distributed.is_initialized()
    if state.is_main_process:
        Path(out_path).write_text(json.dumps(values))
    state.wait_for_everyone()


if __name__ == "__main__":
    _distributed_main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
