"""DecoderTrainer: one AdamW, one learning-rate schedule and one EMA per trained U-Net, on Accelerate.

The trainer owns everything that changes weights; the epoch loop (`loop.py`) owns the order of
phases. Under DistributedDataParallel (the default) every process holds every U-Net whole; when
the launch asks for sharding (`accelerator.sharding`, see `runtime.sharding_from_launcher`), the
trained U-Nets and their EMAs are split across processes (`sharding.py`) and the trainer's state
is saved and loaded shard by shard (`sharded_state`, `load_sharded`).

Within `train_step` the only value read back to the host is, at each optimizer step, the
finiteness of the gradient norms (computed after the gradients were all-reduced, so every rank
takes the same decision); the losses stay on the device. The loop itself synchronises with the
host every step as well: in a multi-process run its stop check all-reduces a flag and reads it
(`StopRequest.check`), and every `LOG_EVERY_N_STEPS` steps it reads the averaged losses.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from accelerate import Accelerator
from torch import nn

from ..common.per_unet import per_unet
from ..config.root import TrainDecoderConfig
from ..config.train import TrainConfig
from ..models.decoder import Decoder
from ..runtime import ddp_ignore
from ..tracking.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    check_state_names,
    load_state_dict_checked,
)
from ..tracking.sharded import SHARDED_FORMAT
from . import sharding as sharded
from .ema import EMA
from .lr_schedule import lr_factor, warmup_factor  # noqa: F401 (warmup_factor: imported from here by callers)
from .posthoc_ema import PosthocEMA


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
        used_unets: Optional[Sequence[int]] = None,
        max_nonfinite_streak: int = 20,
        seed: Optional[int] = None,
        run_steps: Optional[int] = None,
    ):
        """`seed`: the run's seed, which seeds the random streams of accumulated micro-batches (see
        `_micro_batch_rng`); None draws every micro-batch from the process's stream. `run_steps`: the
        run's optimizer steps, over which a decaying `train.lr_schedule` decays unless
        `train.lr_decay_steps` says otherwise."""
        self.accelerator = accelerator
        self.seed = seed
        self.sharding = getattr(accelerator, "sharding", None)
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

        lrs = per_unet(config.lr, num_unets)
        wds = per_unet(config.wd, num_unets)
        self.max_grad_norms = per_unet(config.max_grad_norm, num_unets)

        for number, unet in enumerate(decoder.unets, start=1):
            unet.requires_grad_(number in self.trained_unets)
        self._place_on_device()
        self.sharded = self.sharding is not None and bool(self.trained_unets)

        self.optimizers: Dict[int, torch.optim.Optimizer] = {}
        self.schedulers: Dict[int, torch.optim.lr_scheduler.LambdaLR] = {}
        self.emas: Dict[int, EMA] = {}
        self.lr_decay_steps: Dict[int, Optional[int]] = {}
        """Per trained U-Net, the optimizer steps its decaying learning rate reaches the minimum at (None: constant)."""
        self.lrs = lrs
        self.wds = wds
        if config.use_ema:
            for number in self.trained_unets:
                # Copied from the U-Net before it is sharded, and then sharded alike.
                self.emas[number] = EMA(
                    decoder.get_unet(number),
                    config.ema_beta,
                    update_after_step=config.ema_update_after_step,
                    update_every=config.ema_update_every,
                    warmup=config.ema_warmup,
                )
        self.posthoc: Optional[PosthocEMA] = None
        if config.posthoc_ema_sigma_rels:
            if self.sharded:
                from ..config.errors import ConfigError

                raise ConfigError(
                    [
                        "train.posthoc_ema_sigma_rels: post-hoc EMA is not supported with sharded (FSDP) training, "
                        "whose processes hold only shards of each U-Net; set it to null or launch without FSDP"
                    ]
                )
            unets = {number: decoder.get_unet(number) for number in self.trained_unets}
            self.posthoc = PosthocEMA(unets, config.posthoc_ema_sigma_rels, config.posthoc_ema_every_n_steps)
        if self.sharded:
            self._shard()
        fused = accelerator.device.type == "cuda"
        for number in self.trained_unets:
            unet = decoder.get_unet(number)
            groups = parameter_groups(unet, wds[number - 1], group=config.group_wd_params)
            optimizer = torch.optim.AdamW(
                groups, lr=lrs[number - 1], betas=ADAM_BETAS, eps=ADAM_EPS, fused=fused or None
            )
            factor, self.lr_decay_steps[number] = _schedule(config, number, run_steps)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            # Not wrapped by Accelerate: with several optimizers the loss scaler must unscale each
            # once, step each, then update once; the wrapper would update after every optimizer.
            self.optimizers[number] = optimizer
            self.schedulers[number] = scheduler

        # One wrapper around the whole decoder: its forward picks the U-Net by number, so
        # DistributedDataParallel sees the other U-Nets as unused in that step and, being unused on
        # every rank, leaves their gradients untouched. Sharded U-Nets synchronise themselves.
        self.model = accelerator.prepare_model(decoder) if self.trained_unets and not self.sharded else decoder
        self._stream_states: Dict[int, Dict[str, Any]] = {}
        """The random state of each accumulated micro-batch's stream after its last use (k >= 1)."""

        self.step = 0  # optimizer steps taken (all trained U-Nets step together)
        self.micro_step = 0  # micro-batches seen (gradient accumulation)
        self.nonfinite_steps = 0  # steps skipped because the gradients were not finite
        self.nonfinite_streak = 0

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

    @contextlib.contextmanager
    def _micro_batch_rng(self, slot: int) -> Iterator[None]:
        """Micro-batch `slot` of an optimizer step draws its noise from a stream of its own.

        Slot 0 uses the process's stream (seeded `seed + rank`, as always); slot k >= 1 of rank r a
        stream seeded `seed + k * processes + r`. Each micro-batch of the global batch then has
        the stream it would have with one process per micro-batch: a run of P processes
        accumulating A micro-batches draws what P * A processes without accumulation draw, so the
        two compute the same optimizer steps on the same data (tests/test_sharded_training.py
        compares 2 sharded processes with 1 process accumulating 2).
        """
        if slot == 0 or self.seed is None:
            yield
            return
        acc = self.accelerator
        devices = [acc.device] if acc.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            state = self._stream_states.get(slot)
            if state is None:
                torch.manual_seed(self.seed + slot * acc.num_processes + acc.process_index)
            else:
                set_stream_state(state, acc.device)
            yield
            self._stream_states[slot] = stream_state(acc.device)

    def rng_streams(self) -> Dict[str, Any]:
        """The accumulated micro-batches' random streams (saved with each process's RNG state)."""
        return {str(slot): state for slot, state in self._stream_states.items()}

    def restore_rng_streams(self, saved: Dict[str, Any]) -> None:
        self._stream_states = {int(slot): state for slot, state in (saved or {}).items()}

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

        Sharded U-Nets gather each block's weights as it runs; what FSDP keeps gathered after a
        forward pass without backward is freed on the way out.
        """
        originals = {}
        was_training = self.decoder.training
        try:
            for number, ema in self.emas.items():
                originals[number] = self.decoder.get_unet(number)
                _replace_unet(self.decoder, number, ema.averaged)
            self.decoder.eval()
            yield self.decoder
        finally:
            for number, unet in originals.items():
                _replace_unet(self.decoder, number, unet)
            self.decoder.train(was_training)
            if self.sharded:
                trained = [self.decoder.get_unet(n) for n in self.trained_unets]
                sharded.reshard(trained + [ema.averaged for ema in self.emas.values()])

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
        """Everything needed to continue training exactly (weights-only loadable).

        Sharded: everything but the tensors of the decoder, optimizers and EMAs, which
        `sharded_state` gives (shards) and `tracking.sharded` writes.
        """
        if self.sharded:
            state = {
                "sharded": {
                    "format": SHARDED_FORMAT,
                    "files": self.accelerator.num_processes,
                    "emas": [str(n) for n in self.emas],
                },
            }
        else:
            state = {
                "decoder": {name: t.detach().cpu() for name, t in self.decoder.state_dict().items()},
                "optimizers": {str(n): opt.state_dict() for n, opt in self.optimizers.items()},
                "emas": {str(n): ema.state_dict() for n, ema in self.emas.items()},
            }
        state.update(
            {
                "schedulers": {str(n): sch.state_dict() for n, sch in self.schedulers.items()},
                "counters": {
                    "step": self.step,
                    "micro_step": self.micro_step,
                    "nonfinite_steps": self.nonfinite_steps,
                    "nonfinite_streak": self.nonfinite_streak,
                },
                "trained_unets": list(self.trained_unets),
            }
        )
        if self.posthoc is not None:
            state["posthoc_ema"] = self.posthoc.state_dict()
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        return state

    def _parameter_names(self, number: int) -> List[str]:
        """Names (in the U-Net) of the parameters of U-Net `number`'s optimizer, in its order."""
        by_param = {id(p): name for name, p in self.decoder.get_unet(number).named_parameters()}
        return [by_param[id(p)] for group in self.optimizers[number].param_groups for p in group["params"]]

    def sharded_state(self) -> Dict[str, torch.Tensor]:
        """The tensors of the trainer state by `tracking.sharded` key: shards (DTensors) of the trained
        U-Nets, their optimizer moments and EMAs, whole tensors of the rest. Every process holds
        the same keys; none gathers anything."""
        tensors = {f"decoder/{name}": t.detach() for name, t in self.decoder.state_dict().items()}
        for number, ema in self.emas.items():
            tensors.update({f"emas/{number}/{name}": t.detach() for name, t in ema.state_dict().items()})
        for number, optimizer in self.optimizers.items():
            names = self._parameter_names(number)
            for index, entry in optimizer.state_dict()["state"].items():
                for key, value in entry.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"optimizers/{number}/{names[index]}/{key}"] = value
        return tensors

    def load_sharded(self, folder, state: Dict[str, Any]) -> List[str]:
        """Restore a sharded checkpoint into this sharded trainer (every process together): each
        process reads the parts of the shard files its own shards cover, whatever the number of
        processes that wrote them. `state`: the checkpoint's trainer state (`checkpoint.pt`)."""
        from pathlib import Path

        from ..tracking.sharded import load_into, stored_shapes

        folder = Path(folder)
        shapes = stored_shapes(folder)
        targets = {f"decoder/{name}": t for name, t in self.decoder.state_dict().items()}
        _check_stored(folder, "decoder/", targets, shapes)
        moments: Dict[int, Dict[str, Dict[str, torch.Tensor]]] = {}
        for number, ema in self.emas.items():
            own = {f"emas/{number}/{name}": t for name, t in ema.state_dict().items()}
            if all(key in shapes for key in own):
                targets.update(own)
        for number in self.trained_unets:
            prefix = f"optimizers/{number}/"
            parameters = dict(self.decoder.get_unet(number).named_parameters())
            for key, shape in shapes.items():
                if not key.startswith(prefix):
                    continue
                name, _, entry = key[len(prefix) :].rpartition("/")
                parameter = parameters.get(name)
                if parameter is None:
                    continue  # reported below by the moments' own check
                target = torch.empty_like(parameter) if tuple(shape) == tuple(parameter.shape) else torch.zeros(shape)
                moments.setdefault(number, {}).setdefault(name, {})[entry] = target
                targets[key] = target
        load_into(folder, targets)
        for ema in self.emas.values():
            ema._count = None  # the loaded `num_updates` is read at the next update
        saved = {str(n): {"state": entries} for n, entries in moments.items()}
        return self.load_state_dict({**state, "optimizers_by_name": saved, "sharded_loaded": True})

    def load_state_dict(self, state: Dict[str, Any], *, weights_only: bool = False) -> List[str]:
        """Restore a `state_dict()` (or one converted from a DALLE2-pytorch checkpoint); returns notes for the user.

        With `weights_only`, take the decoder weights and nothing else. Otherwise optimizer,
        scheduler and EMA states are restored for the U-Nets trained in both runs, so a run may
        train a different set of U-Nets than the checkpoint's (e.g. fine-tuning the upsampler);
        whatever cannot be carried over is named in the returned notes. The learning rates and
        weight decays of the current config are applied to the restored optimizers.
        """
        notes: List[str] = []
        from ..tracking.reference import release_mismatch

        problem = release_mismatch(self.decoder.unets, state.get("reference_release"), "the checkpoint")
        if problem:
            raise CheckpointError(problem)
        already = bool(state.get("sharded_loaded"))  # `load_sharded` has put the tensors in place
        if already:
            pass
        elif state.get("partial_decoder"):
            notes += self._load_present_unets(state["decoder"])
        else:
            self._load_whole(self.decoder, state["decoder"], source="checkpoint decoder weights")
        if weights_only:
            for number, ema in self.emas.items():
                ema.copy_from(self.decoder.get_unet(number))
            return notes
        optimizers, by_name = state.get("optimizers", {}), state.get("optimizers_by_name", {})
        schedulers, scheduler_steps = state.get("schedulers", {}), state.get("scheduler_steps", {})
        emas = state.get("emas", {})
        saved_trained = [int(n) for n in state.get("trained_unets", [])]
        for number in self.trained_unets:
            key = str(number)
            optimizer = self.optimizers[number]
            try:
                if key in optimizers and self.sharded:
                    self._load_optimizer_by_name(number, self._by_name(number, optimizers[key]))
                elif key in optimizers:
                    optimizer.load_state_dict(optimizers[key])
                elif key in by_name:
                    self._load_optimizer_by_name(number, by_name[key])
                else:
                    notes.append(
                        f"U-Net {number}: the checkpoint has no optimizer state for it (not trained there); "
                        "its optimizer starts fresh"
                    )
            except (ValueError, KeyError, RuntimeError) as error:
                optimizer.state.clear()
                notes.append(f"U-Net {number}: optimizer state not carried over ({error}); its optimizer starts fresh")
            if key in schedulers:
                self.schedulers[number].load_state_dict(schedulers[key])
            elif key in scheduler_steps:
                self.schedulers[number].last_epoch = int(scheduler_steps[key])
            if number in self.emas:
                if already and key in state.get("sharded", {}).get("emas", []):
                    pass
                elif key in emas:
                    self._load_ema(number, emas[key])
                else:
                    self.emas[number].copy_from(self.decoder.get_unet(number))
                    if saved_trained:
                        notes.append(
                            f"U-Net {number}: no EMA in the checkpoint; the average starts from the loaded weights"
                        )
            self._apply_hyperparameters(number)
        frozen = sorted(set(saved_trained) - set(self.trained_unets))
        if frozen:
            notes.append(
                f"U-Net(s) {', '.join(map(str, frozen))}: frozen now (train.unet_training_mask); their weights "
                "are loaded, their optimizer and EMA states in the checkpoint are not used"
            )
        saved_emas = set(emas) | set(state.get("sharded", {}).get("emas", []))
        dropped = sorted(set(int(n) for n in saved_emas) & set(self.trained_unets) - set(self.emas))
        if dropped:
            notes.append(f"EMA state of U-Net(s) {', '.join(map(str, dropped))} not used: train.use_ema is false")
        if self.posthoc is not None:
            unets = {number: self.decoder.get_unet(number) for number in self.trained_unets}
            notes += self.posthoc.load_state_dict(state.get("posthoc_ema"), unets)
        if "scaler" in state and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        counters = state.get("counters", {})
        self.step = int(counters.get("step", 0))
        self.micro_step = int(counters.get("micro_step", self.step * self.grad_accum))
        self.nonfinite_steps = int(counters.get("nonfinite_steps", 0))
        self.nonfinite_streak = int(counters.get("nonfinite_streak", 0))
        return notes

    def _load_whole(self, module: nn.Module, weights: Dict[str, torch.Tensor], *, source: str) -> None:
        """Load whole tensors into `module`, which may hold sharded U-Nets (each process keeps its shards)."""
        if not self.sharded:
            load_state_dict_checked(module, weights, source=source)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        check_state_names(module, weights, source)
        set_model_state_dict(module, dict(weights), options=StateDictOptions(full_state_dict=True))

    def _load_ema(self, number: int, saved: Dict[str, torch.Tensor]) -> None:
        """An EMA's whole state (`averaged.*`, `num_updates`) into EMA `number`, sharded or not."""
        ema = self.emas[number]
        if not self.sharded:
            ema.load_state_dict(saved)
            return
        prefix = "averaged."
        self._load_whole(
            ema.averaged,
            {name[len(prefix) :]: t for name, t in saved.items() if name.startswith(prefix)},
            source=f"checkpoint EMA of U-Net {number}",
        )
        if "num_updates" in saved:
            ema.num_updates.copy_(saved["num_updates"])
        ema._count = None

    def _load_present_unets(self, weights: Dict[str, torch.Tensor]) -> List[str]:
        """Load the U-Nets a (DALLE2-pytorch) checkpoint holds; the others keep their weights, with a note."""
        notes = []
        for number, unet in enumerate(self.decoder.unets, start=1):
            prefix = f"unets.{number - 1}."
            own = {name[len(prefix) :]: tensor for name, tensor in weights.items() if name.startswith(prefix)}
            if own:
                self._load_whole(unet, own, source=f"checkpoint weights of U-Net {number}")
            else:
                notes.append(
                    f"U-Net {number}: not in the checkpoint (the run that wrote it did not train it); "
                    "it keeps its initial weights"
                )
        known = tuple(f"unets.{index}." for index in range(self.num_unets))
        extra = sorted(
            {name.split(".")[1] for name in weights if not name.startswith(known) and name.startswith("unets.")}
        )
        if extra:
            raise CheckpointError(
                f"the checkpoint has weights of U-Net(s) {', '.join(str(int(i) + 1) for i in extra)}, "
                f"but the configured decoder has {self.num_unets}"
            )
        return notes

    def _by_name(self, number: int, saved: Dict[str, Any]) -> Dict[str, Any]:
        """An optimizer state dict saved by index (a whole checkpoint's) keyed by parameter name instead."""
        names = self._parameter_names(number)
        saved_count = sum(len(group["params"]) for group in saved.get("param_groups", []))
        if saved_count != len(names):
            raise ValueError(f"the checkpoint's optimizer has {saved_count} parameters, this U-Net's {len(names)}")
        order = [index for group in saved["param_groups"] for index in group["params"]]
        position = {index: at for at, index in enumerate(order)}
        return {"state": {names[position[index]]: entry for index, entry in saved.get("state", {}).items()}}

    def _load_optimizer_by_name(self, number: int, saved: Dict[str, Any]) -> None:
        """Restore Adam moments saved per parameter name (converted from DALLE2-pytorch), in our order."""
        unet = self.decoder.get_unet(number)
        optimizer = self.optimizers[number]
        by_param = {id(p): name for name, p in unet.named_parameters()}
        per_name = saved["state"]
        names = [by_param[id(p)] for group in optimizer.param_groups for p in group["params"]]
        unknown = sorted(set(per_name) - set(names))
        if unknown:
            raise KeyError(f"moments saved for {len(unknown)} parameter(s) this U-Net does not have, e.g. {unknown[0]}")
        # Parameters without saved moments (never given a gradient there) start theirs at zero.
        per_name = dict(per_name)
        for group in optimizer.param_groups:
            for p in group["params"]:
                entry = per_name.get(by_param[id(p)])
                if entry is not None and tuple(entry["exp_avg"].shape) != tuple(p.shape):
                    raise ValueError(
                        f"moments of {by_param[id(p)]} have shape {tuple(entry['exp_avg'].shape)}, "
                        f"the parameter {tuple(p.shape)}"
                    )
                if entry is not None and self.sharded:
                    per_name[by_param[id(p)]] = {key: _like(value, p) for key, value in entry.items()}
        # The usual loader casts and places each state like its parameter (the step stays a CPU tensor).
        optimizer.load_state_dict(
            {
                "state": {index: per_name[name] for index, name in enumerate(names) if name in per_name},
                "param_groups": [
                    {
                        **{k: v for k, v in group.items() if k != "params"},
                        "params": list(range(start, start + len(group["params"]))),
                    }
                    for group, start in zip(optimizer.param_groups, _starts(optimizer.param_groups))
                ],
            }
        )

    def _apply_hyperparameters(self, number: int) -> None:
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


def _check_stored(folder, prefix: str, targets: Dict[str, torch.Tensor], shapes: Dict[str, torch.Size]) -> None:
    """The decoder weights of a sharded checkpoint against the configured decoder, all differences at once."""
    expected = {key[len(prefix) :]: t for key, t in targets.items() if key.startswith(prefix)}
    stored = {key[len(prefix) :]: shape for key, shape in shapes.items() if key.startswith(prefix)}
    missing = sorted(name for name in expected if name not in stored)
    unexpected = sorted(name for name in stored if name not in expected)
    mismatched = sorted(
        f"{name} {tuple(stored[name])} vs {tuple(expected[name].shape)}"
        for name in expected
        if name in stored and tuple(stored[name]) != tuple(expected[name].shape)
    )
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(f"{folder} (decoder weights)", missing, unexpected, mismatched)


def _like(value: Any, parameter: torch.Tensor) -> Any:
    """A whole moment tensor split like its sharded parameter (each process keeps its own part, no
    communication); scalars and tensors already sharded as they are."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(parameter, DTensor) or isinstance(value, DTensor) or not isinstance(value, torch.Tensor):
        return value
    if tuple(value.shape) != tuple(parameter.shape):
        return value
    return distribute_tensor(
        value.to(parameter.device), parameter.device_mesh, parameter.placements, src_data_rank=None
    )


def stream_state(device: torch.device) -> Dict[str, Any]:
    """The global random state a micro-batch stream draws from (CPU, and the CUDA device's)."""
    state: Dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_stream_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _starts(groups: Sequence[Dict[str, Any]]) -> List[int]:
    starts, total = [], 0
    for group in groups:
        starts.append(total)
        total += len(group["params"])
    return starts
