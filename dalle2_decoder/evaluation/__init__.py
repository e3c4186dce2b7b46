"""Evaluation metrics (FID, IS, KID, LPIPS, fidelity) on images generated from validation embeddings.

- `Evaluator`: built from the evaluate config, the accelerator, the validation loader and the
  U-Nets to sample through; called with a decoder, it returns the metrics. The training loop's
  evaluate phase and the stand-alone command (`dalle2_decoder.evaluate`,
  `python -m dalle2_decoder.evaluation`) both use it.
- `evaluate_decoder(...)`: the same as one function, on any decoder, loader and metric suite.
- `MetricSuite`: the configured torchmetrics metrics, computed once over the samples of all ranks.
- `paired_errors`, `clip_similarity` (`fidelity.py`): per-sample fidelity of generated images to
  the true images and to the embeddings they were generated from.

See docs/EVALUATION.md. Nothing here imports `training`: evaluation sits below it.
"""

from .evaluate import Evaluator, evaluate_decoder, evaluation_loader, fidelity_clip, final_image_size
from .extractors import EvaluationSetupError
from .fidelity import clip_similarity, paired_errors
from .metrics import FidelityScores, MetricSuite, ScriptedLPIPS, canonical_order

__all__ = [
    "EvaluationSetupError",
    "Evaluator",
    "FidelityScores",
    "MetricSuite",
    "ScriptedLPIPS",
    "canonical_order",
    "clip_similarity",
    "evaluate_decoder",
    "evaluation_loader",
    "fidelity_clip",
    "final_image_size",
    "paired_errors",
]
