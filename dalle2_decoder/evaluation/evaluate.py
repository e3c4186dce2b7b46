"""Generate images from validation embeddings on every rank and score them against the real ones.

`Evaluator` is what the training loop's evaluate phase and the evaluation command
(`dalle2_decoder.evaluate`) both run: built from runtime objects at setup (so a metric that
cannot be built stops a run before training), then called with the decoder holding the weights to
evaluate. `evaluate_decoder` is the same as one function.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
from accelerate import Accelerator
from torch import nn

from ..common.images import resize
from ..common.progress import ProgressOutput
from ..config.evaluate import EvaluateConfig
from ..config.root import TrainDecoderConfig
from ..stopping import StopRequest, StopRequested
from .extractors import EvaluationSetupError
from .metrics import MetricSuite, pooled_count, samples_per_rank

SEED_STRIDE = 1_000_003
"""Sampling noise of batch `i` on rank `r` is seeded with `seed + r * SEED_STRIDE + i`: the same every evaluation."""


def _take(batch: Dict[str, Any], count: int) -> Dict[str, Any]:
    return {key: value[:count] for key, value in batch.items()}


def _first_batches(loader, count: int) -> Iterator[Dict[str, Any]]:
    """Up to `count` batches of `loader`; its workers stop when the iteration ends, early or not."""
    iterator = iter(loader)
    try:
        for _ in range(count):
            batch = next(iterator, None)
            if batch is None:
                return
            yield batch
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


PHASE = "evaluation"


Prepare = Callable[[Dict[str, Any]], Dict[str, Any]]
"""A loader batch to the decoder's inputs on the device (the training's `BatchPreparer.prepare`)."""
Info = Callable[[str], None]


@torch.no_grad()
def evaluate_decoder(
    decoder,
    loader,
    prepare: Prepare,
    accelerator,
    suite: MetricSuite,
    *,
    n_samples: int,
    unets: Sequence[int],
    image_size: int,
    cond_scale: Sequence[float] | float = 1.0,
    seed: int = 0,
    info: Info = lambda message: None,
    stop: Optional[StopRequest] = None,
    progress: Optional[ProgressOutput] = None,
    title: str = "evaluation",
) -> Dict[str, float]:
    """Metrics of `decoder` (already holding the weights to evaluate) on up to `n_samples` validation samples.

    Every rank reads its own share of `loader` (n_samples // ranks samples, one more on the first
    n_samples % ranks ranks, fewer when the split is smaller: the shares add up to n_samples),
    generates images from the embeddings with U-Nets `unets[0]..unets[-1]` (given the real image as
    low-resolution input when `unets[0] > 1`), and updates `suite` with real images resized to
    `image_size` and the generated ones. The metrics are then computed once over all
    ranks' samples. Every rank must call this; only collectives of equal shape happen in it.

    `stop`: checked before each batch and each U-Net call; on a stop signal every rank raises
    `StopRequested` at the same point and the partial results are dropped. `progress`: where this
    process shows its batches (counted in images generated over all ranks), under `title`.
    """
    started = time.perf_counter()
    rank = accelerator.process_index
    quota = samples_per_rank(n_samples, accelerator.num_processes, rank)
    # Every rank runs as many batches as the largest share needs, so that their stop checks (before
    # each batch and U-Net call) line up: a rank whose share is done samples one image it does not count.
    largest = samples_per_rank(n_samples, accelerator.num_processes)
    batches = min(len(loader), math.ceil(largest / max(1, loader.batch_size)))
    done = 0
    suite.reset()
    loader.set_epoch(0)  # the same samples at every evaluation, so values are comparable over a run
    stream = _first_batches(loader, batches)
    if stop is not None:
        stream = stop.batches(stream, accelerator, PHASE)
    on_unet_call = stop.checker(accelerator, PHASE) if stop is not None else None
    meter = (progress or ProgressOutput(enabled=False)).meter(
        title,
        total=batches,
        unit="batches",
        samples_total=min(n_samples, batches * loader.batch_size * accelerator.num_processes),
    )
    try:
        for index, batch in enumerate(stream):
            wanted = min(quota - done, len(batch["image"]))
            batch = prepare(_take(batch, max(wanted, 1)))
            generated = _sample_batch(
                decoder, batch, accelerator, unets, cond_scale, seed + rank * SEED_STRIDE + index, on_unet_call
            )
            if wanted > 0:
                # In float32 whatever the autocast dtype of the samples, so the metrics see the same values.
                real, fake = batch["image"][:wanted].float(), generated[:wanted].float()
                embed = batch.get("image_embed")
                embed = None if embed is None else embed[:wanted]
                suite.update(resize(real, image_size), resize(fake, image_size), embed)
                done += wanted
            # (every rank's share of this batch, as the main process's: the count shown is approximate)
            meter.update(1, samples=max(wanted, 0) * accelerator.num_processes)
    except StopRequested as stopped:
        stopped.progress = f"{done} of this process's {quota} images generated"
        meter.close(stopped=True)
        raise
    finally:
        stream.close()  # stops the loader's workers when we leave before the end of the split
        meter.close()
    metrics = _pooled_metrics(suite, done, accelerator, n_samples=n_samples, seed=seed, info=info)
    metrics["eval/seconds"] = time.perf_counter() - started
    return metrics


def _sample_batch(decoder, batch, accelerator, unets: Sequence[int], cond_scale, seed: int, on_unet_call):
    """Images of U-Nets `unets[0]..unets[-1]` for one prepared batch (its real image as the low-resolution
    input when the first is an upsampler)."""
    with accelerator.autocast():
        return decoder.sample(
            image_embed=batch.get("image_embed"),
            text_encodings=batch.get("text_encodings"),
            text_mask=batch.get("text_mask"),
            cond_scale=list(cond_scale) if isinstance(cond_scale, (list, tuple)) else cond_scale,
            start_at_unet_number=unets[0],
            stop_at_unet_number=unets[-1],
            image=batch["image"] if unets[0] > 1 else None,
            seed=seed,
            on_unet_call=on_unet_call,
        )


def _pooled_metrics(suite: MetricSuite, done: int, accelerator, *, n_samples: int, seed: int, info: Info):
    """The metrics of every rank's `done` samples, computed once over all ranks (every rank calls this)."""
    total = pooled_count(done, accelerator)
    metrics: Dict[str, float] = {"eval/samples": float(total)}
    if total < n_samples:
        info(
            f"evaluation: the validation split gave {total} samples of the {n_samples} asked for "
            "(evaluate.n_evaluation_samples)"
        )
    if total < 2:
        info("evaluation: fewer than 2 samples; metrics skipped")
    else:
        metrics.update(suite.compute(seed=seed))
        for note in suite.notes:
            info(note)
    return metrics


# --- the evaluator: built once, called at every evaluation -----------------------------------------


def final_image_size(config: TrainDecoderConfig, unets: Sequence[int]) -> int:
    """The size of the images sampling through U-Nets `unets` gives (that of the last one)."""
    return config.decoder.image_sizes[unets[-1] - 1]


def evaluation_loader(config: TrainDecoderConfig, accelerator: Accelerator, val_loader=None):
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


def fidelity_clip(config: TrainDecoderConfig, device: torch.device, *, run_clip: Optional[Callable[[], Any]] = None):
    """The CLIP that embeds generated images for CLIP similarity, or None (it is then not computed).

    `evaluate.fidelity.clip` when given, else `decoder.clip`: `run_clip()` when given (the CLIP
    already embedding the run's batches, so it is not loaded twice), else built here. It must give
    embeddings of the dimension the decoder is conditioned on, the CLIP that made them.
    """
    from ..clip import create_clip

    fidelity = config.evaluate.fidelity
    if not config.evaluate.computes_fidelity:
        return None
    if fidelity.clip is not None and fidelity.clip != config.decoder.clip:
        where = "evaluate.fidelity.clip"
        clip = create_clip(fidelity.clip, device=device, where=where)
    elif config.decoder.clip is not None:
        clip = run_clip() if run_clip is not None else create_clip(config.decoder.clip, device=device)
        where = "decoder.clip"
    else:
        return None
    wanted = config.decoder.unets[0].image_embed_dim
    if wanted is not None and clip.image_embed_dim != wanted:
        raise EvaluationSetupError(
            f"{where}: gives {clip.image_embed_dim}-dimensional image embeddings but the decoder is conditioned on "
            f"{wanted}-dimensional ones (decoder.unets[0].image_embed_dim); CLIP similarity needs the CLIP that "
            "made the embeddings"
        )
    return clip


class Evaluator:
    """The configured metrics of a decoder's images generated from validation embeddings.

    Built from runtime objects: `config` (the `evaluate` section: which metrics, how many samples),
    the `accelerator`, the validation `loader` (see `evaluation_loader`), the U-Net numbers to
    sample through (`unets`, from the first to the last; the real image is the low-resolution
    input when the first is not U-Net 1), the `image_size` they give, `prepare` for loader
    batches, the guidance `cond_scale` (one or one per U-Net), the sampling `seed`, `info` for
    notes (main process only), the `stop` request to honour within one batch or U-Net call, and
    the `clip` embedding generated images for CLIP similarity (`fidelity_clip`; None: not computed).
    The metrics are built here, on each node's local main process first (only it downloads weights
    into the cache), so a metric that cannot be built raises EvaluationSetupError now. Every rank
    must build it and call it.
    """

    def __init__(
        self,
        config: EvaluateConfig,
        accelerator: Accelerator,
        loader,
        *,
        unets: Sequence[int],
        image_size: int,
        prepare: Prepare,
        cond_scale: Union[float, Sequence[float]] = 1.0,
        seed: int = 0,
        info: Info = lambda message: None,
        stop: Optional[StopRequest] = None,
        progress: Optional[ProgressOutput] = None,
        clip: Optional[nn.Module] = None,
    ):
        if not unets:
            raise ValueError("Evaluator: no U-Net to sample through")
        self.config = config
        self.accelerator = accelerator
        self.loader = loader
        self.unets: List[int] = list(unets)
        self.image_size = image_size
        self.prepare = prepare
        self.cond_scale = list(cond_scale) if isinstance(cond_scale, (list, tuple)) else cond_scale
        self.seed = seed
        self.info = info
        self.stop = stop
        self.progress = progress
        with accelerator.local_main_process_first():
            self.suite = MetricSuite(
                config.metrics(),
                device=accelerator.device,
                image_size=image_size,
                fidelity=config.computes_fidelity,
                clip=clip,
                coarse_size=config.fidelity.coarse_size,
            )
        self._no_clip_note = (
            "evaluation: no CLIP to embed the generated images (neither decoder.clip nor evaluate.fidelity.clip is "
            "set): eval/clip_similarity is not computed"
            if config.computes_fidelity and clip is None
            else None
        )

    def __call__(self, decoder: nn.Module, *, title: str = PHASE) -> Dict[str, float]:
        """The metrics of `decoder` (already holding the weights to evaluate, in eval mode), on every rank;
        `title` names the progress shown (e.g. `epoch 2/6 evaluation`)."""
        if self._no_clip_note is not None:  # said once, at the first evaluation
            self.info(self._no_clip_note)
            self._no_clip_note = None
        return evaluate_decoder(
            decoder,
            self.loader,
            self.prepare,
            self.accelerator,
            self.suite,
            n_samples=self.config.n_evaluation_samples,
            unets=self.unets,
            image_size=self.image_size,
            cond_scale=self.cond_scale,
            seed=self.seed,
            info=self.info,
            stop=self.stop,
            progress=self.progress,
            title=title,
        )
