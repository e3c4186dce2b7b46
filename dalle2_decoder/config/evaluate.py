"""`evaluate`: image-quality metrics computed on generated validation images."""
from __future__ import annotations

from typing import Any, Dict, Optional

import attrs


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
