"""`evaluate`: image-quality and fidelity metrics computed on generated validation images."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional

import attrs

from .checks import at_least, closest
from .decoder import ClipConfig

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
class FidelityConfig:
    """How close images generated from validation embeddings come to what they encode (docs/EVALUATION.md)."""

    enabled: Optional[bool] = None
    """null: computed with every evaluation (a training run evaluates when another metric is enabled;
    the evaluation command always); true: also gives a training run an evaluate phase of its own;
    false: never computed."""
    clip: Optional[ClipConfig] = None
    """The CLIP whose image embeddings of the samples are compared with the conditioning embeddings:
    the CLIP that made the data's embeddings. null: `decoder.clip`; without either, CLIP similarity
    is not computed (a note says so)."""
    coarse_size: int = 8
    """Both images are area-averaged to this many pixels a side for the coarse paired error."""

    def check(self, path: str) -> List[str]:
        problems = at_least(f"{path}.coarse_size", self.coarse_size, 1)
        return problems + (self.clip.check(f"{path}.clip") if self.clip is not None else [])


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
    fidelity: FidelityConfig = attrs.field(factory=FidelityConfig)
    """CLIP similarity and paired error of the generated images (see `FidelityConfig`)."""

    def metrics(self) -> Dict[str, Dict[str, Any]]:
        """The enabled metrics, by name, with their options."""
        return {name: getattr(self, name) for name in METRIC_CONSTRUCTORS if getattr(self, name) is not None}

    @property
    def computes_fidelity(self) -> bool:
        """Whether an evaluation that runs computes the fidelity metrics."""
        return self.fidelity.enabled is not False

    def in_training(self) -> bool:
        """Whether a training run has an evaluate phase: a metric enabled, or `fidelity.enabled` true.
        The fidelity metrics alone add no sampling to a run that did none unless asked to."""
        return bool(self.metrics()) or self.fidelity.enabled is True

    def in_command(self) -> bool:
        """Whether the evaluation command has anything to compute."""
        return bool(self.metrics()) or self.computes_fidelity

    def check(self, root: "TrainDecoderConfig") -> List[str]:
        """Every metric key must be a named parameter of its torchmetrics constructor (or `weights_path`)."""
        from .structure import constructor_parameters, join_path

        problems = at_least("evaluate.n_evaluation_samples", self.n_evaluation_samples, 1)
        problems += self.fidelity.check("evaluate.fidelity")
        for name, options in self.metrics().items():
            allowed = set(constructor_parameters(METRIC_CONSTRUCTORS[name])) | set(EXTRA_METRIC_OPTIONS)
            for key in options:
                if key not in allowed:
                    match = closest(key, allowed)
                    hint = f" (did you mean {match}?)" if match else ""
                    problems.append(f"{join_path(f'evaluate.{name}', key)}: unknown option{hint}")
        return problems
