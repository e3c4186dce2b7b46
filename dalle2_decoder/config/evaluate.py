"""`evaluate`: image-quality metrics computed on generated validation images."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional

import attrs

from .checks import at_least, closest

if TYPE_CHECKING:
    from .root import TrainDecoderConfig

METRIC_CONSTRUCTORS = {
    "FID": "torchmetrics.image.fid:FrechetInceptionDistance",
    "IS": "torchmetrics.image.inception:InceptionScore",
    "KID": "torchmetrics.image.kid:KernelInceptionDistance",
    "LPIPS": "torchmetrics.image.lpip:LearnedPerceptualImagePatchSimilarity",
}
"""The torchmetrics class each metric's keys are checked against (its named constructor parameters)."""

EXTRA_METRIC_OPTIONS = ("weights_path",)
"""Keys every metric takes besides its constructor's: `weights_path`, a local file with the metric's
backbone weights (Inception or the LPIPS network), for machines that cannot download them."""


@attrs.frozen
class EvaluateConfig:
    """Each metric is enabled by an object whose keys go to its torchmetrics constructor."""

    n_evaluation_samples: int = 1000
    """Number of images to generate for the metrics."""
    FID: Optional[Dict[str, Any]] = None
    """torchmetrics FrechetInceptionDistance arguments; an object enables it."""
    IS: Optional[Dict[str, Any]] = None
    """torchmetrics InceptionScore arguments; an object enables it."""
    KID: Optional[Dict[str, Any]] = None
    """torchmetrics KernelInceptionDistance arguments; an object enables it."""
    LPIPS: Optional[Dict[str, Any]] = None
    """torchmetrics LearnedPerceptualImagePatchSimilarity arguments; an object enables it."""

    def metrics(self) -> Dict[str, Dict[str, Any]]:
        """The enabled metrics, by name, with their options."""
        return {name: getattr(self, name) for name in METRIC_CONSTRUCTORS if getattr(self, name) is not None}

    def check(self, root: "TrainDecoderConfig") -> List[str]:
        """Every metric key must be a named parameter of its torchmetrics constructor (or `weights_path`)."""
        from .structure import constructor_parameters, join_path

        problems = at_least("evaluate.n_evaluation_samples", self.n_evaluation_samples, 1)
        for name, options in self.metrics().items():
            allowed = set(constructor_parameters(METRIC_CONSTRUCTORS[name])) | set(EXTRA_METRIC_OPTIONS)
            for key in options:
                if key not in allowed:
                    match = closest(key, allowed)
                    hint = f" (did you mean {match}?)" if match else ""
                    problems.append(f"{join_path(f'evaluate.{name}', key)}: unknown option{hint}")
        return problems
