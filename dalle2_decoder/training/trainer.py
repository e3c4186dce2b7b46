"""DecoderTrainer: one AdamW, one learning-rate schedule and one EMA per trained U-Net, on Accelerate.

The trainer owns everything that changes weights; the epoch loop (`loop.py`) owns the order of
phases. Under DistributedDataParallel (the default) every process holds every U-Net whole; when
the trainer is given a `Sharding` (`RunContext.sharding`, from an FSDP launch), the trained U-Nets
and their EMAs are split across processes (`sharding.py`) and the trainer's state is saved and
loaded shard by shard (`sharded_state`, `load_sharded`). What a checkpoint holds of the trainer is
a registry of stateful parts (`parts`, built in `trainer_state.py`).

Within `train_step` the only value read back to the host is, at each optimizer step, the
finiteness of the gradient norms (computed after the gradients were all-reduced, so every rank
takes the same decision); the losses stay on the device. The loop itself synchronises with the
host every step as well: in a multi-process run its stop check all-reduces a flag and reads it
(`StopRequest.check`), and every `LOG_EVERY_N_STEPS` steps it reads the averaged losses.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Dict, Iterator, List, Optional, Sequence

import torch
from accelerate import Accelerator
from torch import nn

from ..common.per_unet import per_unet
from ..config.root import TrainDecoderConfig
from ..config.train import TrainConfig
from ..models.decoder import Decoder
from ..runtime import Sharding, ddp_ignore
from ..tracking.checkpoint import CheckpointError, capture_rng_state, restore_rng_state
from . import sharding as sharded
from . import trainer_state
from .ema import EMA
from .lr_schedule import lr_factor, warmup_factor  # noqa: F401 (warmup_factor: imported from here by callers)
from .micro_batches import MicroBatchStreams
from .posthoc_ema import PosthocEMA
from .stateful import StateRegistry


def trained_unets(config: TrainConfig, num_unets: int) -> List[int]:
    """Numbers (from 1) of the U-Nets `train.unet_training_mask` leaves trainable."""
    return [number for number in range(1, num_unets + 1) if config.trains_unet(number)]


def used_unets(config: TrainDecoderConfig) -> List[int]:
    """U-Nets the run trains or samples through: from the first trained one to the last trained one.

    Sampling starts at the first trained U-Net (given the real low-resolution image) and stops at
    the last, so U-Nets outside that range are never used and stay off the device.
    """
    trained = trained_unets(config.train, len(config.decoder.unets))
    return list(range(trained[0], trained[-1] + 1)) if trained else []


def _replace_unet(decoder: Decoder, number: int, unet: nn.Module) -> None:
    """Put `unet` in the place of U-Net `number` (Decoder has a reader, `get_unet`, and no writer)."""
    decoder.get_unet(number)  # its check that the number exists
    decoder.unets[number - 1] = unet


ADAM_BETAS = (0.9, 0.99)
"""AdamW betas, as DALLE2-pytorch's optimizer."""
ADAM_EPS = 1e-8


def parameter_groups(unet: nn.Module, weight_decay: float, *, group: bool = True) -> List[Dict[str, Any]]:
    """AdamW parameter groups as DALLE2-pytorch forms them: decay on tensors of 2 or more dimensions
    (weight matrices, kernels, embeddings), none on the rest (biases, norm scales, scalars).

    Without `group`, one group decays everything. Empty groups are left out.
    """
    parameters = list(unet.parameters())
    if not group:
        return [{"params": parameters, "weight_decay": weight_decay}]
    decayed = [p for p in parameters if p.ndim >= 2]
    plain = [p for p in parameters if p.ndim < 2]
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class DecoderTrainer:
    """Trains the U-Nets that `unet_training_mask` leaves trainable; the others stay frozen.

    U-Nets are numbered from 1, as everywhere in the package. `decoder` must not yet be wrapped:
    the trainer places it on the accelerator's device (leaving U-Nets the run never uses on the
    CPU) and wraps it for distributed training.
    """

    def __init__(
        self,
        decoder: Decoder,
        accelerator: Accelerator,
        config: TrainConfig,
        *,
        sharding: Optional[Sharding] = None,
        used_unets: Optional[Sequence[int]] = None,
        max_nonfinite_streak: int = 20,
        seed: Optional[int] = None,
        run_steps: Optional[int] = None,
    ):
        """`sharding`: split the trained U-Nets across the processes (`RunContext.sharding`, from an
        FSDP launch); None keeps each whole under DDP. `seed`: the run's seed, which seeds the random
        streams of accumulated micro-batches (see `_micro_batch_rng`); None draws every micro-batch
        from the process's stream. `run_steps`: the run's optimizer steps, over which a decaying
        `train.lr_schedule` decays unless `train.lr_decay_steps` says otherwise."""
        self.accelerator = accelerator
        self.seed = seed
        self.sharding = sharding
        self.config = config
        self.decoder = decoder
        num_unets = len(decoder.unets)
        self.num_unets = num_unets
        self.trained_unets: List[int] = trained_unets(config, num_unets)
        # U-Nets that are sampled through or trained; others never leave the CPU.
        self.used_unets = sorted(
            set(used_unets if used_unets is not None else range(1, num_unets + 1)) | set(self.trained_unets)
        )
        self.grad_accum = max(1, config.gradient_accumulation_steps)
        self.max_nonfinite_streak = max_nonfinite_streak
        self.lrs = per_unet(config.lr, num_unets)
        self.wds = per_unet(config.wd, num_unets)
        self.max_grad_norms = per_unet(config.max_grad_norm, num_unets)

        for number, unet in enumerate(decoder.unets, start=1):
            unet.requires_grad_(number in self.trained_unets)
        self._place_on_device()
        self.sharded = self.sharding is not None and bool(self.trained_unets)
        self.emas: Dict[int, EMA] = self._build_emas()  # copied from the U-Nets before they are sharded
        self.posthoc: Optional[PosthocEMA] = self._build_posthoc()
        if self.sharded:
            self._shard()
        self.optimizers: Dict[int, torch.optim.Optimizer] = {}
        self.schedulers: Dict[int, torch.optim.lr_scheduler.LambdaLR] = {}
        self.lr_decay_steps: Dict[int, Optional[int]] = {}
        """Per trained U-Net, the optimizer steps its decaying learning rate reaches the minimum at (None: constant)."""
        self._build_optimizers(run_steps)

        # One wrapper around the whole decoder: its forward picks the U-Net by number, so
        # DistributedDataParallel sees the other U-Nets as unused in that step and, being unused on
        # every rank, leaves their gradients untouched. Sharded U-Nets synchronise themselves.
        self.model = accelerator.prepare_model(decoder) if self.trained_unets and not self.sharded else decoder
        self.micro_batch_streams = MicroBatchStreams(
            seed, accelerator.device, accelerator.num_processes, accelerator.process_index
        )

        self.step = 0  # optimizer steps taken (all trained U-Nets step together)
        self.micro_step = 0  # micro-batches seen (gradient accumulation)
        self.nonfinite_steps = 0  # steps skipped because the gradients were not finite
        self.nonfinite_streak = 0
        self.restoring = trainer_state.Restoring()
        """While `load_state_dict` runs: how the state being loaded came (read by the parts)."""
        self.parts = StateRegistry()
        """What `state_dict()` saves and `load_state_dict()` restores: one registration per part."""
        trainer_state.register_parts(self, self.parts)

    def _build_emas(self) -> Dict[int, EMA]:
        config = self.config
        if not config.use_ema:
            return {}
        return {
            number: EMA(
                self.decoder.get_unet(number),
                config.ema_beta,
                update_after_step=config.ema_update_after_step,
                update_every=config.ema_update_every,
                warmup=config.ema_warmup,
            )
            for number in self.trained_unets
        }

    def _build_posthoc(self) -> Optional[PosthocEMA]:
        config = self.config
        if not config.posthoc_ema_sigma_rels:
            return None
        if self.sharded:
            from ..config.errors import ConfigError

            raise ConfigError(
                [
                    "train.posthoc_ema_sigma_rels: post-hoc EMA is not supported with sharded (FSDP) training, "
                    "whose processes hold only shards of each U-Net; set it to null or launch without FSDP"
                ]
            )
        unets = {number: self.decoder.get_unet(number) for number in self.trained_unets}
        return PosthocEMA(unets, config.posthoc_ema_sigma_rels, config.posthoc_ema_every_n_steps)

    def _build_optimizers(self, run_steps: Optional[int]) -> None:
        # The fused kernel (CUDA and CPU) updates every tensor in one pass. On the CPU torch's default
        # is a Python loop over the tensors: 7% of the demo's training step (py-spy), where the fused
        # kernel took 1.8 ms against the loop's 10 ms for the 32px demo U-Net (1 thread). The two
        # agree to rounding (tests/test_training_trainer.py).
        fused = self.accelerator.device.type in ("cuda", "cpu")
        for number in self.trained_unets:
            unet = self.decoder.get_unet(number)
            groups = parameter_groups(unet, self.wds[number - 1], group=self.config.group_wd_params)
            optimizer = torch.optim.AdamW(
                groups, lr=self.lrs[number - 1], betas=ADAM_BETAS, eps=ADAM_EPS, fused=fused or None
            )
            factor, self.lr_decay_steps[number] = _schedule(self.config, number, run_steps)
            # Not wrapped by Accelerate: with several optimizers the loss scaler must unscale each
            # once, step each, then update once; the wrapper would update after every optimizer.
            self.optimizers[number] = optimizer
            self.schedulers[number] = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    # --- placement -------------------------------------------------------------------------

    def _shard(self) -> None:
        """Split each trained U-Net and its EMA across the processes (see `sharding.py`)."""
        acc, sharding = self.accelerator, self.sharding
        mesh = sharded.device_mesh(sharding, acc.device, acc.num_processes)
        precision = acc.mixed_precision
        for number in self.trained_unets:
            unet = self.decoder.get_unet(number)
            if sharding.activation_checkpointing:
                unet.checkpoint_during_training = True
            sharded.shard_unet(unet, mesh, sharding=sharding, mixed_precision=precision)
            if number in self.emas:
                sharded.shard_unet(self.emas[number].averaged, mesh, sharding=sharding, mixed_precision=precision)
        sharded.release_freed_memory(acc.device)

    def _place_on_device(self) -> None:
        device = self.accelerator.device
        unused_prefixes = tuple(
            f"unets.{number - 1}." for number in range(1, self.num_unets + 1) if number not in self.used_unets
        )
        with torch.no_grad():
            for name, tensor in list(self.decoder.named_parameters()) + list(self.decoder.named_buffers()):
                if not name.startswith(unused_prefixes) or not unused_prefixes:
                    tensor.data = tensor.data.to(device)
        if unused_prefixes and self.accelerator.num_processes > 1:
            # Their weights stay on the CPU; DistributedDataParallel must not try to broadcast them.
            ignored = [
                name
                for name, _ in list(self.decoder.named_parameters()) + list(self.decoder.named_buffers())
                if name.startswith(unused_prefixes)
            ]
            ddp_ignore(self.decoder, ignored)

    # --- training --------------------------------------------------------------------------

    def unet_lr(self, unet_number: int) -> float:
        return self.schedulers[unet_number].get_last_lr()[0]

    def train_step(self, batch: Dict[str, Any]) -> Dict[int, torch.Tensor]:
        """One micro-batch through every trained U-Net; steps the optimizers every `grad_accum` calls.

        Returns each trained U-Net's loss as a detached device tensor (no host synchronisation).
        """
        self.decoder.train()
        slot = self.micro_step % self.grad_accum
        self.micro_step += 1
        sync = self.micro_step % self.grad_accum == 0
        losses: Dict[int, torch.Tensor] = {}
        with self._micro_batch_rng(slot):
            for number in self.trained_unets:
                if self.sharded:
                    context = sharded.gradient_sync([self.decoder.get_unet(number)], sync)
                else:
                    context = contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model)
                with context:
                    loss = self.model(
                        batch["image"],
                        image_embed=batch.get("image_embed"),
                        text_encodings=batch.get("text_encodings"),
                        text_mask=batch.get("text_mask"),
                        unet_number=number,
                    )
                    self.accelerator.backward(loss / self.grad_accum)
                losses[number] = loss.detach()
        if sync:
            self._optimizer_step()
        return losses

    def _micro_batch_rng(self, slot: int) -> ContextManager[None]:
        """Micro-batch `slot` of an optimizer step draws its noise from a stream of its own (`micro_batches.py`)."""
        return self.micro_batch_streams.slot(slot)

    def capture_rng(self) -> Dict[str, Any]:
        """This process's random state: torch's, Python's, numpy's and the micro-batch streams."""
        return {**capture_rng_state(), "micro_batch_streams": self.rng_streams()}

    def restore_rng(self, state: Dict[str, Any]) -> None:
        """Restore what `capture_rng` returned."""
        restore_rng_state(state)
        self.restore_rng_streams(state.get("micro_batch_streams", {}))

    def rng_streams(self) -> Dict[str, Any]:
        """The accumulated micro-batches' random streams (saved with each process's RNG state)."""
        return self.micro_batch_streams.state_dict()

    def restore_rng_streams(self, saved: Dict[str, Any]) -> None:
        self.micro_batch_streams.load_state_dict(saved)

    def _optimizer_step(self) -> None:
        norms = []
        for number in self.trained_unets:
            parameters = [p for p in self.decoder.get_unet(number).parameters() if p.grad is not None]
            max_norm = self.max_grad_norms[number - 1]
            if self.accelerator.scaler is not None:
                self.accelerator.scaler.unscale_(self.optimizers[number])
            if max_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in parameters]) if parameters else torch.zeros(())
            # Sharded gradients give the norm of the whole gradient as a replicated DTensor.
            norms.append(sharded.plain(norm))
        # Gradients are identical on every rank after the all-reduce, so every rank takes the same decision.
        finite = bool(torch.isfinite(torch.stack([n.float().to(self.accelerator.device) for n in norms])).all())
        scaler = self.accelerator.scaler
        if scaler is not None:
            # fp16: the scaler skips the optimizers whose gradients overflowed and lowers its scale.
            for number in self.trained_unets:
                scaler.step(self.optimizers[number])
                self.schedulers[number].step()
            scaler.update()
        elif finite:
            for number in self.trained_unets:
                self.optimizers[number].step()
                self.schedulers[number].step()
        for number in self.trained_unets:
            self.optimizers[number].zero_grad(set_to_none=True)
        if finite:
            self.nonfinite_streak = 0
            for number, ema in self.emas.items():
                ema.update(self.decoder.get_unet(number))
            if self.posthoc is not None:
                self.posthoc.update({number: self.decoder.get_unet(number) for number in self.trained_unets})
        else:
            self.nonfinite_steps += 1
            self.nonfinite_streak += 1
        self.step += 1

    @property
    def too_many_nonfinite(self) -> bool:
        return self.nonfinite_streak >= self.max_nonfinite_streak

    # --- evaluation helpers ----------------------------------------------------------------

    @contextlib.contextmanager
    def sampling_weights(self) -> Iterator[nn.Module]:
        """The decoder with EMA weights in place of the trained U-Nets (when EMA is on), in eval mode.

        Sharded U-Nets gather their weights at their first forward pass inside it and keep them
        until the end (`sharding.gathered`): one all-gather per phase, not one per sampler step.
        """
        originals = {}
        was_training = self.decoder.training
        sampled: List[nn.Module] = []
        if self.sharded:
            sampled = [self.decoder.get_unet(n) for n in self.trained_unets] + [e.averaged for e in self.emas.values()]
        try:
            with sharded.gathered(sampled, self.sharding.reshard_after_forward if self.sharded else True):
                for number, ema in self.emas.items():
                    originals[number] = self.decoder.get_unet(number)
                    _replace_unet(self.decoder, number, ema.averaged)
                self.decoder.eval()
                yield self.decoder
        finally:
            for number, unet in originals.items():
                _replace_unet(self.decoder, number, unet)
            self.decoder.train(was_training)

    @torch.no_grad()
    def validation_losses(self, batch: Dict[str, Any]) -> Dict[int, torch.Tensor]:
        """Loss of each trained U-Net on a batch, with the weights used for sampling."""
        losses = {}
        with self.sampling_weights() as decoder, self.accelerator.autocast():
            for number in self.trained_unets:
                losses[number] = decoder(
                    batch["image"],
                    image_embed=batch.get("image_embed"),
                    text_encodings=batch.get("text_encodings"),
                    text_mask=batch.get("text_mask"),
                    unet_number=number,
                ).detach()
        return losses

    # --- state -----------------------------------------------------------------------------

    def model_state_dict(self) -> Dict[str, torch.Tensor]:
        """Decoder weights for a `model` save: EMA weights of trained U-Nets when EMA is on.

        Sharded: a collective, called on every process; each tensor is gathered whole in turn and
        kept by the main process alone (the others return an empty dict).
        """
        keep = self.accelerator.is_main_process or not self.sharded
        with self.sampling_weights() as decoder:
            weights = {}
            for name, tensor in decoder.state_dict().items():
                whole = sharded.plain(tensor.detach())
                if keep:
                    weights[name] = whole.cpu().clone()
            return weights

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue training exactly (weights-only loadable): each registered
        part's state under its name (`trainer_state.py`).

        Sharded: everything but the tensors of the decoder, optimizers and EMAs, which
        `sharded_state` gives (shards) and `tracking.sharded` writes.
        """
        return self.parts.state_dict()

    def sharded_state(self) -> Dict[str, torch.Tensor]:
        """The trainer's tensors by `tracking.sharded` key, as shards (see `trainer_state.sharded_tensors`)."""
        return trainer_state.sharded_tensors(self)

    def load_sharded(self, folder, state: Dict[str, Any]) -> List[str]:
        """Restore a sharded checkpoint folder into this sharded trainer (every process together)."""
        return trainer_state.load_sharded(self, folder, state)

    def load_state_dict(self, state: Dict[str, Any], *, weights_only: bool = False) -> List[str]:
        """Restore a `state_dict()` (or one converted from a DALLE2-pytorch checkpoint); returns notes for the user.

        With `weights_only`, take the decoder weights and nothing else. Otherwise optimizer,
        scheduler and EMA states are restored for the U-Nets trained in both runs, so a run may
        train a different set of U-Nets than the checkpoint's (e.g. fine-tuning the upsampler);
        whatever cannot be carried over is named in the returned notes. The learning rates and
        weight decays of the current config are applied to the restored optimizers.
        """
        from ..tracking.reference import release_mismatch

        problem = release_mismatch(self.decoder.unets, state.get("reference_release"), "the checkpoint")
        if problem:
            raise CheckpointError(problem)
        self.restoring = trainer_state.restoring(state)
        try:
            if not weights_only:
                return self.parts.load_state_dict(trainer_state.canonical(state))
            notes = self.parts["decoder"].load_state_dict(state["decoder"])
            for number, ema in self.emas.items():
                ema.copy_from(self.decoder.get_unet(number))
            return notes
        finally:
            self.restoring = trainer_state.Restoring()

    def apply_hyperparameters(self, number: int) -> None:
        """The current config's learning rate, weight decay and Adam settings on a restored optimizer."""
        optimizer, scheduler = self.optimizers[number], self.schedulers[number]
        lr, wd = self.lrs[number - 1], self.wds[number - 1]
        decays = [
            g["weight_decay"]
            for g in parameter_groups(self.decoder.get_unet(number), wd, group=self.config.group_wd_params)
        ]
        if len(decays) != len(optimizer.param_groups):
            raise CheckpointError(
                f"U-Net {number}: {len(optimizer.param_groups)} optimizer parameter groups, expected {len(decays)}"
            )
        for group, decay in zip(optimizer.param_groups, decays):
            group.update(initial_lr=lr, weight_decay=decay, betas=ADAM_BETAS, eps=ADAM_EPS)
        scheduler.base_lrs = [lr] * len(optimizer.param_groups)
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _schedule(config: TrainConfig, number: int, run_steps: Optional[int]):
    """U-Net `number`'s learning-rate factor as a function of the optimizer step (`lr_schedule.lr_factor`),
    and the steps it decays over (None for the constant schedule)."""
    from ..config.errors import ConfigError

    warmup = config.for_unet("warmup_steps", number)
    decay_steps = config.for_unet("lr_decay_steps", number)
    if config.lr_schedule != "constant":
        decay_steps = decay_steps if decay_steps is not None else run_steps
        where = "train.lr_decay_steps"
        if decay_steps is None:
            raise ConfigError(
                [f"{where}: the run's length is not known here; give the steps train.lr_schedule decays over"]
            )
        if decay_steps < (warmup or 0) + 2:
            raise ConfigError(
                [
                    f"{where}: the run has {decay_steps} optimizer steps, too few to decay after "
                    f"train.warmup_steps ({warmup or 0}); set train.lr_decay_steps, or train longer"
                ]
            )
    options = dict(
        warmup_steps=warmup,
        schedule=config.lr_schedule,
        decay_steps=decay_steps,
        min_ratio=float(config.for_unet("lr_min_ratio", number)),
    )
    return (lambda step: lr_factor(step, **options)), (decay_steps if config.lr_schedule != "constant" else None)
