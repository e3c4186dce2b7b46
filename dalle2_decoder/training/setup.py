"""The parts of a training run built from its config before the first epoch: this rank's
dataloaders and the evaluate phase's `Evaluator` (built at setup, so that metric weights that
cannot load stop the run before training, not after an epoch)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence

from accelerate import Accelerator

from ..common.progress import ProgressOutput
from ..config.root import TrainDecoderConfig
from ..data import create_dataloaders
from ..stopping import StopRequest
from .batches import BatchPreparer
from .trainer import used_unets

if TYPE_CHECKING:
    from ..evaluation import Evaluator


def run_loaders(config: TrainDecoderConfig, accelerator: Accelerator, batches: BatchPreparer) -> Dict[str, Any]:
    """This rank's `train`, `val` and `test` loaders, as the run reads them (uint8 images, scaled on the device)."""
    return create_dataloaders(
        config.data,
        seed=config.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        epoch_samples=config.train.epoch_samples,
        validation_samples=config.train.validation_samples,
        # Embeddings the data carries must fit the U-Nets; others are counted as bad samples.
        image_embed_dim=config.decoder.unets[0].image_embed_dim,
        text_embed_dim=batches.text_embed_dim,
        pin_memory=accelerator.device.type == "cuda",
        uint8_images=True,  # scaled to [0, 1] on the device by the batch preparer
    )


def run_evaluator(
    config: TrainDecoderConfig,
    accelerator: Accelerator,
    loaders: Dict[str, Any],
    batches: BatchPreparer,
    *,
    cond_scale: Sequence[float],
    info: Callable[[str], None],
    stop: StopRequest,
    progress: ProgressOutput,
) -> Optional["Evaluator"]:
    """The evaluate phase's `Evaluator`, or None when no metric is enabled."""
    unets = used_unets(config)
    if not config.evaluate.in_training() or not unets:
        return None
    # Imported here: the metrics' libraries (torchmetrics) take about a second to import,
    # which every process of a run without an evaluate phase would pay at start.
    from ..evaluation import Evaluator, evaluation_loader, fidelity_clip, final_image_size
    from ..tracking.rng import capture_rng_state, restore_rng_state

    # Building the metrics draws from the process's random streams (Inception's or a CLIP's layers are
    # initialised at random before their weights load): the streams are put back, so that a run's
    # noise, and so its weights, do not depend on which metrics score it.
    before = capture_rng_state()
    try:
        return Evaluator(
            config.evaluate,
            accelerator,
            evaluation_loader(config, accelerator, loaders.get("val")),
            unets=unets,
            image_size=final_image_size(config, unets),
            prepare=batches.prepare,
            cond_scale=cond_scale,
            seed=config.seed,
            info=info,
            stop=stop,
            progress=progress,
            clip=fidelity_clip(config, accelerator.device, run_clip=batches.clip_embedder),
        )
    finally:
        restore_rng_state(before)
