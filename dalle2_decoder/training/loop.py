"""The training run: setup, then each epoch as ordered phases (train, validate, evaluate, sample, save).

Every counter is in training samples seen across all ranks, so logs, saves and resume agree.
Every rank runs every phase and reaches the same collectives in the same order; only the tracker
(a do-nothing stand-in on other ranks) differs, so the loop never asks which rank it is on.

A stop signal is honoured in every phase within one batch or one U-Net call (`StopRequest.check`
raises `StopRequested` on every rank at once): the phase's partial results are dropped, the
checkpoint records the phase as still to do, with the random state of its start, and a resumed run
runs it again, so its weights and logged values are those of a run never stopped.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Dict, Optional

import torch
from accelerate.utils import broadcast_object_list, set_seed

from ..common.per_unet import per_unet
from ..common.progress import ProgressOutput
from ..config.root import TrainDecoderConfig
from ..failures import EXIT_STOPPED
from ..runtime import RunContext, create_run, lost_peers_reported, shut_down
from ..stopping import StopRequest, StopRequested, exit_status_after_stop
from ..tracking import create_tracker
from ..tracking.checkpoint import is_sharded, whole
from ..tracking.protocol import TrackerProtocol
from ..tracking.redact import install_output_redaction, secrets_in
from ..tracking.reference import REFERENCE_ORIGIN, schedule_note
from .batches import BatchPreparer, SampleExamples
from .loss_window import LossWindow
from .lr_schedule import run_optimizer_steps
from .posthoc_ema import SNAPSHOT_FOLDER
from .resume import describe_changes, position_is_kept
from .saving import data_position, gather_ranks, replicas_agree, save_fields, sharded_save
from .setup import run_evaluator, run_loaders
from .start import follow_changes, place_in_epoch, saved_progress
from .state import Phase, Progress, TrainingState, checkpoint_payload
from .summary import summary_lines
from .trainer import DecoderTrainer, used_unets

log = logging.getLogger(__name__)

LOG_EVERY_N_STEPS = 10
"""Losses are averaged across ranks (one all-reduce) every this many steps, not every step."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. a streak of non-finite losses); the last good checkpoint is kept."""

    exit_status: ClassVar[int] = EXIT_STOPPED


# --- the run -------------------------------------------------------------------------------------


class TrainingRun:
    """Everything a run holds, built once; `run()` executes the epochs."""

    def __init__(
        self,
        config: TrainDecoderConfig,
        *,
        context: Optional[RunContext] = None,
        stop: Optional[StopRequest] = None,
    ):
        """`context`: the process's accelerator, sharding and thread policy (`runtime.create_run(config)`
        by default). `stop`: the command's stop request, installed before the run was built (`run()`
        installs its own otherwise)."""
        self.config = config
        # Before anything can print a data URL: one redaction for all output (see docs/TRACKING.md).
        install_output_redaction(secrets_in(config.to_dict()))
        self.context = context or create_run(config)
        self.accelerator = acc = self.context.accelerator
        # Same initial weights on every rank; afterwards each rank draws its own noise.
        set_seed(config.seed)
        decoder = config.decoder.create()
        set_seed(config.seed + acc.process_index)

        self.batches = BatchPreparer(config, device=acc.device)
        self.loaders = run_loaders(config, acc, self.batches)
        train = config.train
        run_steps = run_optimizer_steps(train.epochs, len(self.loaders["train"]), train.gradient_accumulation_steps)
        self.trainer = DecoderTrainer(
            decoder,
            acc,
            train,
            sharding=self.context.sharding,
            used_unets=used_unets(config),
            seed=config.seed,
            run_steps=run_steps,
        )
        self.cond_scale = per_unet(config.train.cond_scale, len(config.decoder.unets))
        self.stop = stop or StopRequest()
        # Bars on a terminal, plain lines every progress_interval_s elsewhere; the main process only.
        self.progress_output = ProgressOutput(
            interval_s=config.tracker.progress_interval_s, enabled=acc.is_main_process
        )
        # Metrics are built now, so that missing weights stop the run before training, not after an epoch.
        self.evaluator = run_evaluator(
            config,
            acc,
            self.loaders,
            self.batches,
            cond_scale=self.cond_scale,
            info=lambda message: self.tracker.info(message),  # the tracker is built after the evaluator
            stop=self.stop,
            progress=self.progress_output,
        )
        # Last: everything that can fail on a bad setup has been built, so no run folder is left half-started.
        self.tracker: TrackerProtocol = create_tracker(
            config.tracker,
            full_config_dict=config.to_dict(),
            is_main_process=acc.is_main_process,
            sharded_checkpoints=self.trainer.sharded,
        )
        if self.trainer.posthoc is not None:  # snapshots beside the checkpoints, by the main process only
            data_path = self.tracker.data_path  # None on the other processes
            self.trainer.posthoc.folder = data_path / SNAPSHOT_FOLDER if data_path is not None else None
            self.trainer.posthoc.config_json = self.tracker.config_json
        self.progress = Progress(next_save_at=config.train.save_every_n_samples)
        self.examples: Dict[str, SampleExamples] = {}
        self._pending_rng: Optional[Dict[str, Any]] = None
        self.resumed = False
        self.interrupted = False
        self._saved_position = self.progress.position()
        """Where the last checkpoint (saved or loaded) resumes from: a stop there has nothing new to save."""
        self._rng_mark: Dict[str, Any] = self.trainer.capture_rng()
        """This rank's random state where the progress now points (a phase's start, or before the next
        training batch is read): what a checkpoint saved on a stop must hold."""
        self.loss_window = LossWindow(self.trainer.trained_unets, acc.device)

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
        if is_sharded(loaded) and not self.trainer.sharded:
            loaded = whole(loaded)  # a sharded run's checkpoint continued by a DDP run: read whole here
        state = TrainingState.from_checkpoint(loaded)  # a damaged file is named in one line, not a KeyError
        reference = state.reference
        progress, saved_config = saved_progress(
            state,
            loaded.config_json,
            batch_samples=self.config.data.batch_size * self.accelerator.num_processes,
            save_every=self.config.train.save_every_n_samples,
        )
        current = self.tracker.config_dict or self.config.to_dict()
        changes = describe_changes(
            saved_config, current, epoch=progress.epoch, mid_epoch=progress.mid_epoch, reference=reference is not None
        )
        if is_sharded(loaded):
            notes = self.trainer.load_sharded(loaded.sharded_path, state.trainer)
        else:
            notes = self.trainer.load_state_dict(state.trainer)
        self.progress = progress
        follow_changes(self.progress, changes, self.config.train.save_every_n_samples)
        rng_states = state.rng
        if self.progress.mid_epoch and position_is_kept(changes):
            self._place_in_epoch(saved_ranks=len(rng_states) or None)
        if position_is_kept(changes) and len(rng_states) == self.accelerator.num_processes:
            # Restored once this rank's data iterator is positioned (see `_train_phase`).
            self._pending_rng = rng_states[self.accelerator.process_index]
        self.resumed = True
        self._saved_position = self.progress.position()
        for change in changes:
            self.tracker.info(change.line())
        for note in notes:
            self.tracker.info(f"note: {note}")
        origin = " (a DALLE2-pytorch checkpoint)" if reference is not None else ""
        self.tracker.info(
            f"resumed from {loaded.source}{origin}: epoch {self.progress.epoch + 1}, "
            f"{self.progress.samples_seen} samples seen, step {self.trainer.step}"
        )

    def _place_in_epoch(self, saved_ranks: Optional[int]) -> None:
        """Where the resumed run goes on inside the epoch it stopped in (`epoch_position.place_in_epoch`)."""
        line = place_in_epoch(self.progress, self.loaders["train"], self.accelerator.num_processes, saved_ranks)
        if line is not None:
            self.tracker.info(line)

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
        """The epochs from where the run stands: 0 when done, the "stopped" status after a stop signal."""
        acc = self.accelerator
        owned = not self.stop.installed
        self.stop.install()  # before anything is printed: a signal from now on leads to a clean save
        try:
            self.tracker.log_summary(summary_lines(self.config, acc, self.trainer, self.loaders))
            self.load_start_checkpoint()
            self.examples = self.batches.share_examples(self.loaders, self.config.train.n_sample_images, acc)
            try:
                if self.config.train.save_immediately and not self.resumed:
                    self._sample_phase()
                    self._save_phase(is_best=False)
                self._epochs()
            except StopRequested as stop:
                return self._stopped(stop)
            self._check_ranks_agree()
            self.tracker.info(
                f"training finished: {self.config.train.epochs} epochs, {self.progress.samples_seen} samples"
            )
            log.info("process %d of %d finished", self.accelerator.process_index + 1, self.accelerator.num_processes)
            return 0
        finally:
            if owned:
                self.stop.uninstall()

    def _epochs(self) -> None:
        """Each epoch's phases in order, from the one the progress points at (a resumed run's included)."""
        progress = self.progress
        if self._pending_rng is not None and progress.phase is not Phase.TRAIN:
            # Resumed after the epoch's training: the random state is that of the phase to run.
            self._restore_rng(self._pending_rng)
            self._pending_rng = None
            self._mark_rng()
        while progress.epoch < self.config.train.epochs:
            if progress.phase is Phase.TRAIN:
                self._train_phase()
                self._enter(Phase.VALIDATE)
            if progress.phase is Phase.VALIDATE:
                progress.val_loss = self._validate_phase()
                self._enter(Phase.EVALUATE)
            if progress.phase is Phase.EVALUATE:
                self._evaluate_phase()
                self._enter(Phase.SAMPLE)
            self._sample_phase()
            val_loss, progress.val_loss = progress.val_loss, None
            is_best = val_loss is not None and val_loss < progress.best_val_loss
            if val_loss is not None:
                progress.validation_losses.append(val_loss)
            if is_best:
                progress.best_val_loss = val_loss
            progress.epoch += 1
            progress.batches_in_epoch = 0
            progress.rest_of_epoch = None
            self._enter(Phase.TRAIN)
            self._save_phase(is_best=is_best)

    def _enter(self, phase: Phase) -> None:
        """Move the progress to `phase`, marking the random state a stop during it must save."""
        self.progress.phase = phase
        self._mark_rng()

    def _mark_rng(self) -> None:
        """Remember this rank's random state as that of the point the progress describes now."""
        self._rng_mark = self.trainer.capture_rng()

    def _restore_rng(self, state: Dict[str, Any]) -> None:
        self.trainer.restore_rng(state)

    def _stopped(self, stop: StopRequested) -> int:
        """After a stop signal: save where the run stands (the cut phase still to do) and say so in one line."""
        progress = self.progress
        where = f"{stop.phase} of epoch {progress.epoch + 1}"
        if progress.position() == self._saved_position:
            saved = "nothing new since the last checkpoint"
        else:
            self._save_phase(is_best=False, rng=self._rng_mark)
            saved = "checkpoint saved"
        self.interrupted = True  # resumable: the run state stays unfinished
        self.tracker.info(
            f"stopped by {stop.signal_name} during {where} ({progress.samples_seen} samples seen): {saved}; "
            "run the same command again to resume"
        )
        return exit_status_after_stop()

    def _train_phase(self) -> None:
        """One epoch of training (or its remainder after a resume); raises StopRequested on a stop."""
        acc, trainer, progress = self.accelerator, self.trainer, self.progress
        loader = self.loaders["train"]
        loader.set_epoch(progress.epoch)
        global_sizes = loader.global_batch_samples()  # each step's samples over all ranks
        self.loss_window.restore(progress.loss_window)  # a resumed run's window; empty otherwise
        progress.loss_window = {}
        batch_samples = self.config.data.batch_size * acc.num_processes
        meter = self.progress_output.meter(
            self._phase_title(Phase.TRAIN),
            total=len(loader),
            unit="batches",
            initial=progress.batches_in_epoch,
            samples_total=len(loader) * batch_samples,
            samples_initial=min(progress.batches_in_epoch, len(loader)) * batch_samples,
        )
        # The stop check comes before each batch is used; the random state is marked before each is
        # read, so a checkpoint saved on a stop holds the state of the point it resumes from.
        batches = self.stop.batches(loader, acc, Phase.TRAIN.label, before_fetch=self._mark_rng)
        try:
            # Mid-epoch resume: read past the batches already trained on, so the data (and the workers'
            # random augmentations) continue exactly where the interrupted run stopped.
            # (A checkpoint from DALLE2-pytorch, or one saved with other data, may count more batches
            # than this epoch has: then the epoch's training is done.)
            for _ in range(min(progress.batches_in_epoch, len(loader))):
                next(batches)
            if self._pending_rng is not None:
                self._restore_rng(self._pending_rng)
                self._pending_rng = None
                self._mark_rng()
            if progress.periodic_due:  # the run stopped in a periodic sample grid: draw it again first
                self._periodic_sample_and_save()
            for batch in batches:
                batch = self.batches.prepare(batch)
                # from the plan: size x ranks (a short last batch included), or the ranks' sum in a
                # rest of epoch shared out after a resume with other ranks (which may differ by one)
                step_samples = global_sizes[progress.batches_in_epoch]
                losses = trainer.train_step(batch)
                for number, loss in losses.items():
                    self.loss_window.loss_sums[number] += loss
                self.loss_window.steps += 1
                self.loss_window.samples += step_samples
                progress.batches_in_epoch += 1
                progress.samples_seen += step_samples
                meter.show({"samples seen": progress.samples_seen, "optimizer steps": trainer.step})
                meter.update(1, samples=step_samples)

                if self.loss_window.steps == LOG_EVERY_N_STEPS:
                    if self.context.compute_threads is not None:
                        self.context.compute_threads.update()
                    lrs = {n: trainer.unet_lr(n) for n in trainer.trained_unets}
                    metrics = self.loss_window.metrics(acc, lrs, epoch=progress.epoch + 1, step=trainer.step)
                    self.tracker.log(metrics, step=progress.samples_seen)
                    meter.show({k[len("train/") :]: v for k, v in metrics.items() if k.startswith("train/loss")})
                    self.loss_window.restore({})

                if trainer.too_many_nonfinite:
                    raise TrainingStopped(
                        f"{trainer.nonfinite_streak} optimizer steps in a row had non-finite gradients; stopping. "
                        "The last good checkpoint is kept; lower train.lr or check the data."
                    )
                if progress.samples_seen >= progress.next_save_at:
                    progress.next_save_at += self.config.train.save_every_n_samples
                    self._periodic_sample_and_save()
        except BaseException:
            meter.close(stopped=True)
            raise
        finally:
            batches.close()
            meter.close()
        self.loss_window.restore({})  # the epoch's last, partial window is not logged
        self._report_data("train", loader)
        if trainer.nonfinite_steps:
            self.tracker.log({"train/nonfinite_steps": trainer.nonfinite_steps}, step=progress.samples_seen)

    def _periodic_sample_and_save(self) -> None:
        """The sample grids and checkpoint due every `save_every_n_samples` samples."""
        self.progress.periodic_due = True
        self._mark_rng()
        self._sample_phase()
        self.progress.periodic_due = False
        self._save_phase(is_best=False)

    def _validate_phase(self) -> Optional[float]:
        """Mean validation loss per trained U-Net, over all ranks; returns their sum (None without data)."""
        acc, trainer = self.accelerator, self.trainer
        loader = self.loaders["val"]
        if len(loader) == 0 or not trainer.trained_unets:
            return None
        loader.set_epoch(self.progress.epoch)
        sums = torch.zeros(len(trainer.trained_unets), device=acc.device)
        count = torch.zeros((), device=acc.device)
        with self.progress_output.meter(self._phase_title(Phase.VALIDATE), total=len(loader), unit="batches") as meter:
            for batch in self.stop.batches(loader, acc, Phase.VALIDATE.label):
                batch = self.batches.prepare(batch)
                losses = trainer.validation_losses(batch)
                size = batch["image"].shape[0]
                sums += torch.stack([losses[n].float() for n in trainer.trained_unets]) * size
                count += size
                meter.update(1, samples=size * acc.num_processes)
        if acc.num_processes > 1:
            sums, count = acc.reduce(sums, reduction="sum"), acc.reduce(count, reduction="sum")
        means = (sums / count.clamp(min=1)).tolist()
        metrics = {f"val/loss/unet{n}": value for n, value in zip(trainer.trained_unets, means)}
        self.tracker.log(metrics, step=self.progress.samples_seen)
        self._report_data("val", loader)
        return float(sum(means))

    def _evaluate_phase(self) -> None:
        """FID / IS / KID / LPIPS and fidelity on generated validation images, when configured (see `evaluation`)."""
        metrics = self.evaluate()
        if metrics:
            self.tracker.log(metrics, step=self.progress.samples_seen)

    def evaluate(self) -> Dict[str, float]:
        """The metrics of the weights being trained (EMA ones when EMA is on); empty when none is configured."""
        if self.evaluator is None:
            return {}
        with self.trainer.sampling_weights() as decoder:
            return self.evaluator(decoder, title=self._phase_title(Phase.EVALUATE))

    def _sample_phase(self) -> None:
        """Grids of real images next to generated ones, from train and test examples, drawn by every rank."""
        progress = self.progress
        if progress.sampled_at == progress.samples_seen:
            return  # e.g. a periodic grid that fell on the last step of the epoch
        if self.trainer.trained_unets:
            check = self.stop.checker(self.accelerator, Phase.SAMPLE.label)
            title = self._phase_title(Phase.SAMPLE)
            with self.progress_output.meter(title, total=len(self.examples), unit="grids") as meter:
                for split, examples in self.examples.items():
                    images, captions = self.batches.sample_grid(
                        self.trainer, examples, self.cond_scale, used_unets(self.config), on_unet_call=check
                    )
                    self.tracker.log_images(f"{split}_examples", images, captions, step=progress.samples_seen)
                    meter.update(1)
        progress.sampled_at = progress.samples_seen

    def _phase_title(self, phase: Phase) -> str:
        """`epoch 2/6 training`: what a progress line or bar is about, in the stop line's words."""
        return f"epoch {self.progress.epoch + 1}/{self.config.train.epochs} {phase.label}"

    def _save_phase(self, *, is_best: bool, rng: Optional[Dict[str, Any]] = None) -> None:
        """Latest (and best) saves through every configured saver; RNG states of every rank included.

        `rng`: this rank's random state to save (by default the current one).
        """
        acc = self.accelerator
        progress = self.progress
        local_rng = rng if rng is not None else self.trainer.capture_rng()
        loader = self.loaders["train"]
        local_position = loader.position(progress.batches_in_epoch) if progress.mid_epoch else None
        rng_states, frontiers = gather_ranks(acc, local_rng, local_position)
        progress.data_position = data_position(progress, acc.num_processes, max(1, loader.num_workers), frontiers)
        progress.loss_window = self.loss_window.state()
        fields = save_fields(progress, self.config.data.batch_size * acc.num_processes)
        checkpoint_state = lambda: checkpoint_payload(self.trainer.state_dict(), progress, rng_states, self.config)  # noqa: E731
        model_state = self.trainer.model_state_dict
        if self.trainer.sharded:
            saving = (self.trainer, self.tracker, self.config.tracker, progress.samples_seen)
            checkpoint_state, model_state = sharded_save(*saving, checkpoint_state=checkpoint_state, is_best=is_best)
        self.tracker.save(
            fields=fields,
            step=self.progress.samples_seen,
            checkpoint_state=checkpoint_state,
            model_state=model_state,
            is_best=is_best,
        )
        acc.wait_for_everyone()
        self._saved_position = progress.position()

    def _check_ranks_agree(self) -> None:
        """Every rank must hold the same weights at the end; a cheap fingerprint comparison proves it."""
        agree = replicas_agree(self.accelerator, self.trainer.decoder)
        if agree is None:
            return
        if not agree:
            raise TrainingStopped("the processes ended with different weights: distributed training went out of sync")
        what = "replicated parameters" if self.trainer.sharded else "parameters"
        self.tracker.info(f"{what} identical across {self.accelerator.num_processes} processes")

    def _report_data(self, phase: str, loader) -> None:
        stats = dict(loader.stats)
        bad = {k: v for k, v in stats.items() if k not in ("seen", "ok") and v}
        if bad:
            self.tracker.log({f"data/{phase}/{k}": v for k, v in bad.items()}, step=self.progress.samples_seen)


def main(config: TrainDecoderConfig, *, stop: Optional[StopRequest] = None) -> int:
    """Train a decoder as the config says: 0 when done, the "stopped" status after a stop signal
    (`stopping.exit_status_after_stop`). Errors propagate to the command line, which reports each as
    one line with an exit status by kind (`dalle2_decoder.failures`). `stop`: the command's stop request."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with lost_peers_reported():
        return TrainingRun(config, stop=stop).execute()
