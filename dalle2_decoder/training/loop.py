"""The training run: setup, then each epoch as ordered phases (train, validate, evaluate, sample, save).

Every counter is in training samples seen across all ranks, so logs, saves and resume agree.
Every rank runs every phase and reaches the same collectives in the same order; only the tracker
(a do-nothing stand-in on other ranks) differs, so the loop never asks which rank it is on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import attrs
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm

from .._version import __version__
from ..config.root import TrainDecoderConfig
from ..tracking import capture_rng_state, create_tracker, restore_rng_state
from ..tracking.checkpoint import training_state
from ..tracking.redact import install_output_redaction, secrets_in
from ..tracking.reference import REFERENCE_ORIGIN, schedule_note
from .batches import BatchPreparer, SampleExamples
from .resume import describe_changes, position_is_kept, reference_progress
from .stopping import StopRequest
from .threads import compute_threads_for
from .trainer import DecoderTrainer, per_unet

log = logging.getLogger(__name__)

LOG_EVERY_N_STEPS = 10
"""Losses are averaged across ranks (one all-reduce) every this many steps, not every step."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. a streak of non-finite losses); the last good checkpoint is kept."""


@attrs.define
class Progress:
    """Where the run is; saved in every checkpoint and restored on resume."""

    epoch: int = 0
    """Epoch in progress (0-based)."""
    batches_in_epoch: int = 0
    """Training batches of `epoch` already consumed on each rank."""
    phase: str = "train"
    """Phase of `epoch` to run next: `train`, or `end` (validate/evaluate/sample/save still to do)."""
    samples_seen: int = 0
    """Training samples consumed so far, summed over ranks."""
    next_save_at: int = 0
    """`samples_seen` at which the next periodic sample grid and checkpoint are due."""
    best_val_loss: float = math.inf
    """Lowest mean validation loss so far (sum over trained U-Nets)."""
    validation_losses: List[float] = attrs.Factory(list)
    """Every epoch's validation loss so far (for the `{validation_losses}` field of save paths)."""

    def to_dict(self) -> Dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "Progress":
        return cls(**{field.name: values[field.name] for field in attrs.fields(cls) if field.name in values})


# --- setup ---------------------------------------------------------------------------------------


def _launched() -> bool:
    """True under `accelerate launch` / torchrun, where the launcher chooses the device."""
    return (
        int(os.environ.get("WORLD_SIZE", "1")) > 1
        or "ACCELERATE_MIXED_PRECISION" in os.environ
        and "LOCAL_RANK" in os.environ
    )


def create_accelerator(config: TrainDecoderConfig, *, purpose: str = "training") -> Accelerator:
    """An Accelerator honouring `train.device` in single-process runs and the launcher otherwise."""
    train = config.train
    # As in DALLE2-pytorch, `train.amp` chooses nothing: without `mixed_precision`, accelerate's
    # launch configuration (ACCELERATE_MIXED_PRECISION) decides, and plain fp32 without one.
    precision = train.mixed_precision
    notes = []
    static_graph, why_not = ddp_static_graph(config)
    if why_not and _launched():
        notes.append(why_not)
    ddp = DistributedDataParallelKwargs(
        find_unused_parameters=train.find_unused_parameters, static_graph=static_graph, broadcast_buffers=False
    )
    if _launched():
        # Without GPUs (or when the launcher asks for the CPU) each process must say so itself,
        # otherwise Accelerate treats the processes as independent single-process runs.
        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        accelerator = Accelerator(mixed_precision=precision, cpu=cpu, kwargs_handlers=[ddp])
        notes.append(
            f"train.device ({train.device}) is superseded by the launcher: this process uses {accelerator.device}"
        )
    else:
        device = torch.device(train.device)
        cpu = device.type == "cpu"
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f'train.device is {train.device} but CUDA is not available here; set train.device to "cpu"'
                )
            torch.cuda.set_device(device.index or 0)
        accelerator = Accelerator(mixed_precision=precision, cpu=cpu, kwargs_handlers=[ddp])
    # On the CPU, each process's share of the node's cores goes to compute, less what its data
    # workers turn out to use (measured during training, see `threads.py`).
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    accelerator.compute_threads = compute_threads_for(accelerator.device.type, local_processes)
    if accelerator.compute_threads is not None:
        threads = accelerator.compute_threads.start()
        notes.append(
            f"CPU {purpose} with {threads} compute thread(s) per process, one fewer per core the data "
            "workers keep busy (set OMP_NUM_THREADS to choose)"
        )
    for note in notes:
        if accelerator.is_main_process:
            print(f"note: {note}", flush=True)
    return accelerator


def ddp_static_graph(config: TrainDecoderConfig) -> Tuple[bool, Optional[str]]:
    """DDP's `static_graph` for this run, and why `train.static_graph` is not used, if it is not.

    A step runs one backward pass per trained U-Net through the one wrapped decoder, each using
    another U-Net's parameters: a static graph cannot take a used set that changes between passes
    (DDP stops with "Your training graph has changed"), so it is only used with one trained U-Net.
    """
    train = config.train
    trained = sum(1 for index in range(len(config.decoder.unets)) if train.trains_unet(index))
    if train.static_graph and trained > 1:
        return False, (
            f"train.static_graph: not used with {trained} trained U-Nets (each one's backward pass uses "
            "other parameters, which a static DDP graph cannot take); set it to false to silence this"
        )
    return train.static_graph, None


def shut_down(accelerator: Accelerator) -> None:
    """End a multi-process run cleanly: all ranks meet, then the process group is destroyed.

    Without it, a rank may exit while the gloo/NCCL threads of its process group still run, and
    the C++ runtime aborts that process ("terminate called without an active exception").
    """
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        accelerator.end_training()


def used_unets(config: TrainDecoderConfig) -> List[int]:
    """U-Nets the run trains or samples through: from the first trained one to the last trained one.

    Sampling starts at the first trained U-Net (given the real low-resolution image) and stops at
    the last, so U-Nets outside that range are never used and stay off the device.
    """
    num = len(config.decoder.unets)
    mask = config.train.unet_training_mask or [True] * num
    trained = [n for n, m in enumerate(mask, start=1) if m]
    return list(range(trained[0], trained[-1] + 1)) if trained else []


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summary_lines(config: TrainDecoderConfig, accelerator: Accelerator, trainer: DecoderTrainer, loaders) -> List[str]:
    """The one-screen summary printed at start."""
    data = config.data
    per_rank = len(loaders["train"]) * data.batch_size
    lines = [
        "dalle2-decoder training",
        f"  processes      {accelerator.num_processes} ({accelerator.distributed_type.value}), device {accelerator.device}",
        f"  precision      {accelerator.mixed_precision}",
        f"  data           {data.webdataset_base_url} shards {data.start_shard}..{data.end_shard}",
        f"  embeddings     {data.img_embeddings_url or ('CLIP on the fly' if config.decoder.clip else 'inside the shards')}",
        f"  samples/epoch  {per_rank * accelerator.num_processes} ({len(loaders['train'])} batches of {data.batch_size} per rank)",
        f"  epochs         {config.train.epochs}",
    ]
    for number, unet in enumerate(trainer.decoder.unets, start=1):
        state = "trained" if number in trainer.trained_unets else "frozen"
        size = config.decoder.image_sizes[number - 1]
        sampler, steps = trainer.decoder.sampler_for(number)  # what sample grids and evaluation use
        lines.append(
            f"  U-Net {number}        {count_parameters(unet) / 1e6:.2f}M parameters, {size}px, {state}, "
            f"samples with {sampler} ({steps or config.decoder.timesteps} steps)"
        )
    return lines


# --- the run -------------------------------------------------------------------------------------


class TrainingRun:
    """Everything a run holds, built once; `run()` executes the epochs."""

    def __init__(self, config: TrainDecoderConfig, *, accelerator: Optional[Accelerator] = None):
        self.config = config
        # Before anything can print a data URL: one redaction for all output (see docs/TRACKING.md).
        install_output_redaction(secrets_in(config.to_dict()))
        self.accelerator = accelerator or create_accelerator(config)
        acc = self.accelerator
        # Same initial weights on every rank; afterwards each rank draws its own noise.
        set_seed(config.seed)
        decoder = config.decoder.create()
        set_seed(config.seed + acc.process_index)

        self.batches = BatchPreparer(config, device=acc.device)
        from ..data import create_dataloaders

        self.loaders = create_dataloaders(
            config.data,
            seed=config.seed,
            rank=acc.process_index,
            world_size=acc.num_processes,
            epoch_samples=config.train.epoch_samples,
            validation_samples=config.train.validation_samples,
            # Embeddings the data carries must fit the U-Nets; others are counted as bad samples.
            image_embed_dim=config.decoder.unets[0].image_embed_dim,
            text_embed_dim=self.batches.text_embed_dim,
            pin_memory=acc.device.type == "cuda",
            uint8_images=True,  # scaled to [0, 1] on the device by the batch preparer
        )
        self.trainer = DecoderTrainer(decoder, acc, config.train, used_unets=used_unets(config))
        # Metrics are built now, so that missing weights stop the run before training, not after an epoch.
        from ..evaluation import prepare_evaluation

        prepare_evaluation(self)
        # Last: everything that can fail on a bad setup has been built, so no run folder is left half-started.
        self.tracker = create_tracker(
            config.tracker, full_config_dict=config.to_dict(), is_main_process=acc.is_main_process
        )
        self.progress = Progress(next_save_at=config.train.save_every_n_samples)
        self.stop = StopRequest()
        self.cond_scale = per_unet(config.train.cond_scale, len(config.decoder.unets))
        self.examples: Dict[str, SampleExamples] = {}
        self._pending_rng: Optional[Dict[str, Any]] = None
        self.resumed = False
        self.interrupted = False
        self._last_sampled_at: Optional[int] = None

    # --- start ---------------------------------------------------------------------------------

    def load_start_checkpoint(self) -> None:
        """Start from `tracker.load` or the interrupted run's checkpoint: a checkpoint continues its run.

        As in DALLE2-pytorch, a checkpoint carries its run on (progress, optimizers, schedulers,
        EMA), also when the config changed: each change is applied or refused, one line each,
        and whatever of the training state cannot be carried over is named. A model save gives
        weights only and the run starts fresh.
        """
        loaded = self.tracker.load(broadcast=broadcast_object_list if self.accelerator.num_processes > 1 else None)
        if loaded is None:
            return
        if loaded.origin == REFERENCE_ORIGIN:
            note = schedule_note(self.trainer.decoder.beta_schedules)
            if note:
                self.tracker.info(f"note: {note}")
        if loaded.kind == "model":
            notes = self.trainer.load_state_dict(
                {"decoder": loaded.model_state, "partial_decoder": loaded.partial}, weights_only=True
            )
            for note in notes:
                self.tracker.info(f"note: {note}")
            self.tracker.info(f"loaded decoder weights from {loaded.source}; training starts fresh")
            return
        state = training_state(loaded)  # a damaged file is named in one line, not a KeyError
        reference = state.get("reference")
        if reference is not None:
            progress = reference_progress(
                reference,
                batch_samples=self.config.data.batch_size * self.accelerator.num_processes,
                save_every=self.config.train.save_every_n_samples,
            )
            saved_config = reference.get("config")
        else:
            progress = dict(state["progress"])
            saved_config = json.loads(loaded.config_json) if loaded.config_json else None
        current = getattr(self.tracker, "config_dict", None) or self.config.to_dict()
        mid_epoch = progress["phase"] == "train" and progress["batches_in_epoch"] > 0
        changes = describe_changes(
            saved_config, current, epoch=progress["epoch"], mid_epoch=mid_epoch, reference=reference is not None
        )
        notes = self.trainer.load_state_dict(state["trainer"])
        self.progress = Progress.from_dict(progress)
        if any(c.path == "train.save_every_n_samples" for c in changes):
            self.progress.next_save_at = self.progress.samples_seen + self.config.train.save_every_n_samples
        if any(not c.applied for c in changes):
            self.progress.batches_in_epoch = 0  # the refused in-epoch position (see the change's line)
        rng_states = state.get("rng", [])
        if position_is_kept(changes) and len(rng_states) == self.accelerator.num_processes:
            # Restored once this rank's data iterator is positioned (see `_train_phase`).
            self._pending_rng = rng_states[self.accelerator.process_index]
        self.resumed = True
        for change in changes:
            self.tracker.info(change.line())
        for note in notes:
            self.tracker.info(f"note: {note}")
        origin = " (a DALLE2-pytorch checkpoint)" if reference is not None else ""
        self.tracker.info(
            f"resumed from {loaded.source}{origin}: epoch {self.progress.epoch + 1}, "
            f"{self.progress.samples_seen} samples seen, step {self.trainer.step}"
        )

    # --- the epochs ----------------------------------------------------------------------------

    def execute(self) -> int:
        """`run()`, then close the tracker: finished, failed, or interrupted (resumable)."""
        try:
            status = self.run()
        except BaseException:
            self.tracker.finish(success=False)
            raise
        self.tracker.finish(success=True, interrupted=self.interrupted)
        shut_down(self.accelerator)
        return status

    def run(self) -> int:
        acc = self.accelerator
        self.stop.install()  # before anything is printed: a signal from now on leads to a clean save
        try:
            for line in summary_lines(self.config, acc, self.trainer, self.loaders):
                self.tracker.info(line)
            self.load_start_checkpoint()
            self.examples = self.batches.pick_examples(self.loaders, self.config.train.n_sample_images)
            if self.config.train.save_immediately and not self.resumed:
                self._sample_phase()
                self._save_phase(is_best=False)
            while self.progress.epoch < self.config.train.epochs:
                if self.progress.phase == "train":
                    if not self._train_phase():
                        self.interrupted = True  # stopped by a signal, checkpoint saved: resumable
                        return 0
                    self.progress.phase = "end"
                val_loss = self._validate_phase()
                self._evaluate_phase()
                self._sample_phase()
                is_best = val_loss is not None and val_loss < self.progress.best_val_loss
                if val_loss is not None:
                    self.progress.validation_losses.append(val_loss)
                if is_best:
                    self.progress.best_val_loss = val_loss
                self.progress.epoch += 1
                self.progress.batches_in_epoch = 0
                self.progress.phase = "train"
                self._save_phase(is_best=is_best)
            self._check_ranks_agree()
            self.tracker.info(
                f"training finished: {self.config.train.epochs} epochs, {self.progress.samples_seen} samples"
            )
            log.info("process %d of %d finished", self.accelerator.process_index + 1, self.accelerator.num_processes)
            return 0
        finally:
            self.stop.uninstall()

    def _train_phase(self) -> bool:
        """One epoch of training (or its remainder after a resume). False when stopped by a signal."""
        acc, trainer, progress = self.accelerator, self.trainer, self.progress
        loader = self.loaders["train"]
        loader.set_epoch(progress.epoch)
        loss_sums = {n: torch.zeros((), device=acc.device) for n in trainer.trained_unets}
        steps_in_window = window_samples = 0
        window_start = time.perf_counter()
        bar = tqdm(
            total=len(loader),
            initial=progress.batches_in_epoch,
            desc=f"epoch {progress.epoch + 1} train",
            disable=not acc.is_main_process,
            dynamic_ncols=True,
            leave=False,
        )
        iterator = iter(loader)
        # Mid-epoch resume: read past the batches already trained on, so the data (and the workers'
        # random augmentations) continue exactly where the interrupted run stopped.
        # (A checkpoint from DALLE2-pytorch, or one saved with other data, may count more batches
        # than this epoch has: then the epoch's training is done.)
        for _ in range(min(progress.batches_in_epoch, len(loader))):
            next(iterator)
        if self._pending_rng is not None:
            restore_rng_state(self._pending_rng)
            self._pending_rng = None
        try:
            for batch in iterator:
                batch = self.batches.prepare(batch)
                # every rank's batch has this size (a short last batch included: exact epochs give
                # each rank the same number of samples), so the samples of this step are size x ranks
                step_samples = batch["image"].shape[0] * acc.num_processes
                losses = trainer.train_step(batch)
                for number, loss in losses.items():
                    loss_sums[number] += loss
                steps_in_window += 1
                progress.batches_in_epoch += 1
                progress.samples_seen += step_samples
                window_samples += step_samples
                bar.update(1)

                if steps_in_window == LOG_EVERY_N_STEPS:
                    if getattr(acc, "compute_threads", None) is not None:
                        acc.compute_threads.update()
                    metrics = self._window_metrics(loss_sums, steps_in_window, window_samples, window_start)
                    self.tracker.log(metrics, step=progress.samples_seen)
                    postfix = {k.split("/")[-1]: f"{v:.4f}" for k, v in metrics.items() if k.startswith("train/loss")}
                    bar.set_postfix({**postfix, "samples/s": f"{metrics['train/samples_per_s']:.1f}"})
                    loss_sums = {n: torch.zeros((), device=acc.device) for n in trainer.trained_unets}
                    steps_in_window, window_samples, window_start = 0, 0, time.perf_counter()

                if trainer.too_many_nonfinite:
                    raise TrainingStopped(
                        f"{trainer.nonfinite_streak} optimizer steps in a row had non-finite gradients; stopping. "
                        "The last good checkpoint is kept; lower train.lr or check the data."
                    )
                if self.stop.agreed(acc):
                    self.tracker.info(f"{self.stop.signal_name or 'stop request'}: saving a checkpoint and exiting")
                    self._save_phase(is_best=False)
                    return False
                if progress.samples_seen >= progress.next_save_at:
                    progress.next_save_at += self.config.train.save_every_n_samples
                    self._sample_phase()
                    self._save_phase(is_best=False)
        finally:
            bar.close()
        self._report_data("train", loader)
        if trainer.nonfinite_steps:
            self.tracker.log({"train/nonfinite_steps": trainer.nonfinite_steps}, step=progress.samples_seen)
        return True

    def _window_metrics(self, loss_sums, steps: int, samples: int, window_start: float) -> Dict[str, float]:
        acc = self.accelerator
        numbers = sorted(loss_sums)
        stacked = torch.stack([loss_sums[n] / steps for n in numbers])
        averaged = acc.reduce(stacked, reduction="mean") if acc.num_processes > 1 else stacked
        values = averaged.tolist()
        elapsed = max(time.perf_counter() - window_start, 1e-9)
        metrics = {f"train/loss/unet{n}": v for n, v in zip(numbers, values)}
        metrics.update({f"train/lr/unet{n}": self.trainer.unet_lr(n) for n in numbers})
        metrics["train/samples_per_s"] = samples / elapsed
        metrics["epoch"] = self.progress.epoch + 1
        return metrics

    def _validate_phase(self) -> Optional[float]:
        """Mean validation loss per trained U-Net, over all ranks; returns their sum (None without data)."""
        acc, trainer = self.accelerator, self.trainer
        loader = self.loaders["val"]
        if len(loader) == 0 or not trainer.trained_unets:
            return None
        loader.set_epoch(self.progress.epoch)
        sums = torch.zeros(len(trainer.trained_unets), device=acc.device)
        count = torch.zeros((), device=acc.device)
        for batch in tqdm(
            loader, desc=f"epoch {self.progress.epoch + 1} validate", disable=not acc.is_main_process, leave=False
        ):
            batch = self.batches.prepare(batch)
            losses = trainer.validation_losses(batch)
            size = batch["image"].shape[0]
            sums += torch.stack([losses[n].float() for n in trainer.trained_unets]) * size
            count += size
        if acc.num_processes > 1:
            sums, count = acc.reduce(sums, reduction="sum"), acc.reduce(count, reduction="sum")
        means = (sums / count.clamp(min=1)).tolist()
        metrics = {f"val/loss/unet{n}": value for n, value in zip(trainer.trained_unets, means)}
        self.tracker.log(metrics, step=self.progress.samples_seen)
        self._report_data("val", loader)
        return float(sum(means))

    def _evaluate_phase(self) -> None:
        """FID / IS / KID / LPIPS on generated validation images, when configured (see `evaluation`)."""
        from ..evaluation import run_evaluation

        metrics = run_evaluation(self)
        if metrics:
            self.tracker.log(metrics, step=self.progress.samples_seen)

    def _sample_phase(self) -> None:
        """Grids of real images next to generated ones, from train and test examples (main rank only)."""
        acc = self.accelerator
        if self._last_sampled_at == self.progress.samples_seen:
            return  # e.g. a periodic grid that fell on the last step of the epoch
        self._last_sampled_at = self.progress.samples_seen
        if acc.is_main_process and self.trainer.trained_unets:
            for split, examples in self.examples.items():
                images, captions = self.batches.sample_grid(
                    self.trainer, examples, self.cond_scale, used_unets(self.config)
                )
                self.tracker.log_images(f"{split}_examples", images, captions, step=self.progress.samples_seen)
        acc.wait_for_everyone()

    def _save_phase(self, *, is_best: bool) -> None:
        """Latest (and best) saves through every configured saver; RNG states of every rank included."""
        acc = self.accelerator
        rng = gather_object([capture_rng_state()]) if acc.num_processes > 1 else [capture_rng_state()]
        progress = self.progress
        batch_samples = self.config.data.batch_size * acc.num_processes
        if progress.phase == "train" and progress.batches_in_epoch == 0 and progress.epoch > 0:
            # The end-of-epoch save (the epoch counter has moved on): named after the epoch it ends.
            fields = {"epoch": progress.epoch - 1, "sample": 0, "next_task": "sample"}
        else:
            fields = {
                "epoch": progress.epoch,
                "sample": progress.batches_in_epoch * batch_samples,
                "next_task": "train",
            }
        fields.update(validation_losses=list(progress.validation_losses), samples_seen=progress.samples_seen)
        self.tracker.save(
            fields=fields,
            step=self.progress.samples_seen,
            checkpoint_state=lambda: {
                "trainer": self.trainer.state_dict(),
                "progress": self.progress.to_dict(),
                "rng": rng,
                "config_digest": config_digest(self.config),
                "package_version": __version__,
            },
            model_state=self.trainer.model_state_dict,
            is_best=is_best,
        )
        acc.wait_for_everyone()

    def _check_ranks_agree(self) -> None:
        """Every rank must hold the same weights at the end; a cheap fingerprint comparison proves it."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return
        fingerprint = torch.stack([p.detach().double().sum() for p in self.trainer.decoder.parameters()]).to(acc.device)
        gathered = acc.gather(fingerprint[None]).cpu()
        if not all(torch.equal(gathered[0], row) for row in gathered[1:]):
            raise TrainingStopped("the processes ended with different weights: distributed training went out of sync")
        self.tracker.info(f"parameters identical across {acc.num_processes} processes")

    def _report_data(self, phase: str, loader) -> None:
        stats = dict(loader.stats)
        bad = {k: v for k, v in stats.items() if k not in ("seen", "ok") and v}
        if bad:
            self.tracker.log({f"data/{phase}/{k}": v for k, v in bad.items()}, step=self.progress.samples_seen)


def config_digest(config: TrainDecoderConfig) -> str:
    """Identifies the config a checkpoint was saved with: one saved by the same config continues the run.

    A digest rather than the JSON itself, because the tracker masks secrets in checkpoint strings.
    """
    return hashlib.sha256(config.to_json(indent=None).encode()).hexdigest()


def setup_errors() -> tuple:
    """Errors that describe a problem with the user's setup: reported in one message, no traceback."""
    from ..clip import ClipLoadError
    from ..data import BadDataError, DataSetupError, PreprocessingError
    from ..evaluation import EvaluationSetupError
    from ..tracking import CheckpointError, DataPathError, LoadError, TrackerSetupError

    return (
        ClipLoadError,
        BadDataError,
        DataSetupError,
        PreprocessingError,
        CheckpointError,
        DataPathError,
        LoadError,
        TrackerSetupError,
        EvaluationSetupError,
        TrainingStopped,
    )


def main(config: TrainDecoderConfig) -> int:
    """Train a decoder as the config says: 0 done or stopped by a signal. Errors propagate to the
    command line, which reports each as one line with an exit status by kind (`dalle2_decoder.failures`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return TrainingRun(config).execute()
    except RuntimeError as error:
        if not lost_peer(error):
            raise
        # A node or process died: the collective it left fails here (gloo/NCCL close the connection)
        # and this process ends too, with one line, instead of the launcher printing a child's traceback.
        raise PeerLostError(
            "lost contact with another process of this run (a node or process died, or the network failed; see the "
            f"other nodes' logs). The last checkpoint is kept. {type(error).__name__}: {error}"
        ) from error


class PeerLostError(RuntimeError):
    """Another process of the run is gone (reported as one line, exit status 5: I/O or environment)."""


def lost_peer(error: BaseException) -> bool:
    """True for the error a collective raises when another rank is gone."""
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, getattr(dist, "DistError", ())) or any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "NCCL", "gloo/transport")
    )
