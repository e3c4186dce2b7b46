"""Evaluation metrics (FID, IS, KID, LPIPS) on images generated from validation embeddings.

- `run_evaluation(run)`: the training loop's evaluate phase (see `training.loop.TrainingRun`);
  `prepare_evaluation(run)` builds its metrics ahead, at setup.
- `evaluate_decoder(...)`: the same on any decoder and loader; the stand-alone command
  (`python -m dalle2_decoder.evaluation`) uses it on a saved checkpoint.
- `MetricSuite`: the configured torchmetrics metrics, computed once over the samples of all ranks.
See docs/EVALUATION.md.
"""

from .evaluate import build_suite, evaluate_decoder, evaluation_loader, prepare_evaluation, run_evaluation
from .extractors import EvaluationSetupError
from .metrics import MetricSuite, ScriptedLPIPS, canonical_order

__all__ = [
    "EvaluationSetupError",
    "MetricSuite",
    "ScriptedLPIPS",
    "build_suite",
    "canonical_order",
    "evaluate_decoder",
    "evaluation_loader",
    "prepare_evaluation",
    "run_evaluation",
]
