"""Generate images from validation embeddings on every rank and score them against the real ones."""

from __future__ import annotations

import math
import time
import weakref
from typing import Any, Callable, Dict, Sequence

import torch
import torch.nn.functional as F

from .metrics import MetricSuite, pooled_count, samples_per_rank

SEED_STRIDE = 1_000_003
"""Sampling noise of batch `i` on rank `r` is seeded with `seed + r * SEED_STRIDE + i`: the same every evaluation."""


def _take(batch: Dict[str, Any], count: int) -> Dict[str, Any]:
    return {key: value[:count] for key, value in batch.items()}


def resize_to(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.float()
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@torch.no_grad()
def evaluate_decoder(
    decoder,
    loader,
    prepare: Callable[[Dict[str, Any]], Dict[str, Any]],
    accelerator,
    suite: MetricSuite,
    *,
    n_samples: int,
    unets: Sequence[int],
    image_size: int,
    cond_scale: Sequence[float] | float = 1.0,
    seed: int = 0,
    info: Callable[[str], None] = lambda message: None,
) -> Dict[str, float]:
    """Metrics of `decoder` (already holding the weights to evaluate) on up to `n_samples` validation samples.

    Every rank reads its own share of `loader` (ceil(n_samples / ranks) samples, fewer when the split
    is smaller), generates images from the embeddings with U-Nets `unets[0]..unets[-1]` (given the
    real image as low-resolution input when `unets[0] > 1`), and updates `suite` with real images
    resized to `image_size` and the generated ones. The metrics are then computed once over all
    ranks' samples. Every rank must call this; only collectives of equal shape happen in it.
    """
    started = time.perf_counter()
    quota = samples_per_rank(n_samples, accelerator.num_processes)
    batches = min(len(loader), math.ceil(quota / max(1, loader.batch_size)))
    start, stop = unets[0], unets[-1]
    rank = accelerator.process_index
    done = 0
    suite.reset()
    loader.set_epoch(0)  # the same samples at every evaluation, so values are comparable over a run
    iterator = iter(loader)
    try:
        for index in range(batches):
            batch = next(iterator, None)
            if batch is None:
                break
            wanted = min(quota - done, len(batch["image"]))
            batch = prepare(_take(batch, wanted))
            with accelerator.autocast():
                generated = decoder.sample(
                    image_embed=batch.get("image_embed"),
                    text_encodings=batch.get("text_encodings"),
                    text_mask=batch.get("text_mask"),
                    cond_scale=list(cond_scale) if isinstance(cond_scale, (list, tuple)) else cond_scale,
                    start_at_unet_number=start,
                    stop_at_unet_number=stop,
                    image=batch["image"] if start > 1 else None,
                    seed=seed + rank * SEED_STRIDE + index,
                )
            suite.update(resize_to(batch["image"], image_size), resize_to(generated, image_size))
            done += wanted
    finally:
        del iterator  # stops the loader's workers when we leave before the end of the split
    total = pooled_count(done, accelerator)
    metrics: Dict[str, float] = {"eval/samples": float(total)}
    if total < n_samples:
        info(
            f"evaluation: the validation split gave {total} samples of the {n_samples} asked for (evaluate.n_evaluation_samples)"
        )
    if total < 2:
        info("evaluation: fewer than 2 samples; metrics skipped")
    else:
        metrics.update(suite.compute(seed=seed))
        for note in suite.notes:
            info(note)
    metrics["eval/seconds"] = time.perf_counter() - started
    return metrics


# --- the training loop's evaluate phase -----------------------------------------------------------

_PER_RUN: "weakref.WeakKeyDictionary[Any, Dict[str, Any]]" = weakref.WeakKeyDictionary()
"""Per training run: its metric suite and evaluation loader, built at the first evaluation and kept."""


def final_image_size(config, unets: Sequence[int]) -> int:
    return config.decoder.image_sizes[unets[-1] - 1]


def evaluation_loader(config, accelerator, val_loader=None):
    """The validation split read exactly (every sample once, no repeats); `val_loader` when it already is."""
    if val_loader is not None and val_loader.dataset.settings.limit is None:
        return val_loader
    from ..data import create_dataloaders

    loaders = create_dataloaders(
        config.data,
        seed=config.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        epoch_samples=config.train.epoch_samples,
        validation_samples=None,
        test_samples=None,
        image_embed_dim=None if config.decoder.clip else config.decoder.unets[0].image_embed_dim,
        pin_memory=accelerator.device.type == "cuda",
    )
    return loaders["val"]


def build_suite(config, accelerator, unets: Sequence[int]) -> MetricSuite:
    """The configured metrics, built on each node's local main process first (only it downloads weights into the cache)."""
    # Per node: weights are cached on local disks, so each node's local main process fetches them first.
    with accelerator.local_main_process_first():
        return MetricSuite(
            config.evaluate.metrics(), device=accelerator.device, image_size=final_image_size(config, unets)
        )


def prepare_evaluation(run) -> bool:
    """Build a `TrainingRun`'s metrics and evaluation loader now (False when no metric is enabled).

    Call it at setup so that a metric that cannot be built (weights missing offline, a bad
    TorchScript file) stops the run before training, not after the first epoch. `run_evaluation`
    calls it when it was not called. Every rank must call it.
    """
    from ..training.loop import used_unets

    config = run.config
    unets = used_unets(config)
    if not config.evaluate.metrics() or not unets:
        return False
    if run not in _PER_RUN:
        _PER_RUN[run] = {
            "suite": build_suite(config, run.accelerator, unets),
            "loader": evaluation_loader(config, run.accelerator, run.loaders.get("val")),
        }
    return True


def run_evaluation(run) -> Dict[str, float]:
    """The evaluate phase of a `TrainingRun`: metrics of the weights being trained; empty when none is configured."""
    from ..training.loop import used_unets

    if not prepare_evaluation(run):
        return {}
    config = run.config
    unets = used_unets(config)
    state = _PER_RUN[run]
    with run.trainer.sampling_weights() as decoder:
        return evaluate_decoder(
            decoder,
            state["loader"],
            run.batches.prepare,
            run.accelerator,
            state["suite"],
            n_samples=config.evaluate.n_evaluation_samples,
            unets=unets,
            image_size=final_image_size(config, unets),
            cond_scale=run.cond_scale,
            seed=config.seed,
            info=run.tracker.info,
        )
