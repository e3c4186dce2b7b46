"""DecoderTrainer: one AdamW, one learning-rate schedule and one EMA per trained U-Net, on Accelerate.

The trainer owns everything that changes weights; the epoch loop (`loop.py`) owns the order of
phases. Within `train_step` the only value read back to the host is, at each optimizer step, the
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
from ..tracking.checkpoint import CheckpointError, load_state_dict_checked
from .ema import EMA


def trained_unets(config: TrainConfig, num_unets: int) -> List[int]:
    """Numbers (from 1) of the U-Nets `train.unet_training_mask` leaves trainable."""
    return [number for number in range(1, num_unets + 1) if config.trains_unet(number - 1)]


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


def warmup_factor(step: int, warmup_steps: Optional[int]) -> float:
    """Learning-rate multiplier after `step` optimizer steps: linear warm-up, then constant."""
    if not warmup_steps:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


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
    ):
        self.accelerator = accelerator
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

        self.optimizers: Dict[int, torch.optim.Optimizer] = {}
        self.schedulers: Dict[int, torch.optim.lr_scheduler.LambdaLR] = {}
        self.emas: Dict[int, EMA] = {}
        self.lrs = lrs
        self.wds = wds
        fused = accelerator.device.type == "cuda"
        for number in self.trained_unets:
            unet = decoder.get_unet(number)
            groups = parameter_groups(unet, wds[number - 1], group=config.group_wd_params)
            optimizer = torch.optim.AdamW(
                groups, lr=lrs[number - 1], betas=ADAM_BETAS, eps=ADAM_EPS, fused=fused or None
            )
            warmup = config.for_unet("warmup_steps", number - 1)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step, warmup=warmup: warmup_factor(step, warmup)
            )
            # Not wrapped by Accelerate: with several optimizers the loss scaler must unscale each
            # once, step each, then update once; the wrapper would update after every optimizer.
            self.optimizers[number] = optimizer
            self.schedulers[number] = scheduler
            if config.use_ema:
                self.emas[number] = EMA(
                    unet,
                    config.ema_beta,
                    update_after_step=config.ema_update_after_step,
                    update_every=config.ema_update_every,
                    warmup=config.ema_warmup,
                )

        # One wrapper around the whole decoder: its forward picks the U-Net by number, so
        # DistributedDataParallel sees the other U-Nets as unused in that step and, being unused on
        # every rank, leaves their gradients untouched.
        self.model = accelerator.prepare_model(decoder) if self.trained_unets else decoder

        self.step = 0  # optimizer steps taken (all trained U-Nets step together)
        self.micro_step = 0  # micro-batches seen (gradient accumulation)
        self.nonfinite_steps = 0  # steps skipped because the gradients were not finite
        self.nonfinite_streak = 0

    # --- placement -------------------------------------------------------------------------

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
        self.micro_step += 1
        sync = self.micro_step % self.grad_accum == 0
        losses: Dict[int, torch.Tensor] = {}
        for number in self.trained_unets:
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

    def _optimizer_step(self) -> None:
        norms = []
        for number in self.trained_unets:
            parameters = [p for p in self.decoder.get_unet(number).parameters() if p.grad is not None]
            max_norm = self.max_grad_norms[number - 1]
            if self.accelerator.scaler is not None:
                self.accelerator.scaler.unscale_(self.optimizers[number])
            if max_norm is not None:
                norms.append(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
            else:
                norms.append(
                    torch.nn.utils.get_total_norm([p.grad for p in parameters]) if parameters else torch.zeros(())
                )
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
        """The decoder with EMA weights in place of the trained U-Nets (when EMA is on), in eval mode."""
        originals = {}
        try:
            for number, ema in self.emas.items():
                originals[number] = self.decoder.get_unet(number)
                _replace_unet(self.decoder, number, ema.averaged)
            was_training = self.decoder.training
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
        """Decoder weights for a `model` save: EMA weights of trained U-Nets when EMA is on."""
        with self.sampling_weights() as decoder:
            return {name: tensor.detach().cpu().clone() for name, tensor in decoder.state_dict().items()}

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue training exactly (weights-only loadable)."""
        state: Dict[str, Any] = {
            "decoder": {name: t.detach().cpu() for name, t in self.decoder.state_dict().items()},
            "optimizers": {str(n): opt.state_dict() for n, opt in self.optimizers.items()},
            "schedulers": {str(n): sch.state_dict() for n, sch in self.schedulers.items()},
            "emas": {str(n): ema.state_dict() for n, ema in self.emas.items()},
            "counters": {
                "step": self.step,
                "micro_step": self.micro_step,
                "nonfinite_steps": self.nonfinite_steps,
                "nonfinite_streak": self.nonfinite_streak,
            },
            "trained_unets": list(self.trained_unets),
        }
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        return state

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
        if state.get("partial_decoder"):
            notes += self._load_present_unets(state["decoder"])
        else:
            load_state_dict_checked(self.decoder, state["decoder"], source="checkpoint decoder weights")
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
                if key in optimizers:
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
                if key in emas:
                    self.emas[number].load_state_dict(emas[key])
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
        dropped = sorted(set(int(n) for n in emas) & set(self.trained_unets) - set(self.emas))
        if dropped:
            notes.append(f"EMA state of U-Net(s) {', '.join(map(str, dropped))} not used: train.use_ema is false")
        if "scaler" in state and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        counters = state.get("counters", {})
        self.step = int(counters.get("step", 0))
        self.micro_step = int(counters.get("micro_step", self.step * self.grad_accum))
        self.nonfinite_steps = int(counters.get("nonfinite_steps", 0))
        self.nonfinite_streak = int(counters.get("nonfinite_streak", 0))
        return notes

    def _load_present_unets(self, weights: Dict[str, torch.Tensor]) -> List[str]:
        """Load the U-Nets a (DALLE2-pytorch) checkpoint holds; the others keep their weights, with a note."""
        notes = []
        for number, unet in enumerate(self.decoder.unets, start=1):
            prefix = f"unets.{number - 1}."
            own = {name[len(prefix) :]: tensor for name, tensor in weights.items() if name.startswith(prefix)}
            if own:
                load_state_dict_checked(unet, own, source=f"checkpoint weights of U-Net {number}")
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
        for group in optimizer.param_groups:
            for p in group["params"]:
                entry = per_name.get(by_param[id(p)])
                if entry is not None and tuple(entry["exp_avg"].shape) != tuple(p.shape):
                    raise ValueError(
                        f"moments of {by_param[id(p)]} have shape {tuple(entry['exp_avg'].shape)}, "
                        f"the parameter {tuple(p.shape)}"
                    )
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


def _starts(groups: Sequence[Dict[str, Any]]) -> List[int]:
    starts, total = [], 0
    for group in groups:
        starts.append(total)
        total += len(group["params"])
    return starts
