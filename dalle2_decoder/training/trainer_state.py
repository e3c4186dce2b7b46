"""The trainer's state as stateful parts: what `DecoderTrainer.state_dict()` saves and how each piece loads.

Each part is registered once in the trainer's `StateRegistry` (`register_parts`) under the key it
has in a checkpoint's trainer state, in the order of the file format:

    sharded, decoder, optimizers, emas, schedulers, counters, trained_unets, posthoc_ema, scaler

A sharded run saves `sharded` (the layout of its shard files) instead of `decoder`, `optimizers`
and `emas`, whose tensors its shard files hold (`sharded_tensors`, `load_sharded`). Loading
restores the optimizer, scheduler and EMA of every U-Net trained in both runs; whatever cannot be
carried over is returned as notes for the user.

Other writers' layouts (DALLE2-pytorch's checkpoints converted by `tracking.reference`, a sharded
folder read whole by `tracking.sharded.whole_trainer_state`) hold `optimizers_by_name` and
`scheduler_steps`: `canonical` folds them into the parts' entries before loading.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence

import attrs
import torch
from torch import nn

from ..tracking.checkpoint import CheckpointError, CheckpointMismatchError, check_state_names, load_state_dict_checked
from ..tracking.sharded import SHARDED_FORMAT
from .stateful import StateRegistry

if TYPE_CHECKING:
    from .trainer import DecoderTrainer


@attrs.frozen
class Restoring:
    """How the state being loaded came: what the parts cannot tell from their own entries."""

    saved_trained: Sequence[int] = ()
    """U-Nets the saving run trained."""
    partial_decoder: bool = False
    """The decoder weights may cover only some U-Nets (a DALLE2-pytorch file leaves frozen ones out)."""
    tensors_in_place: bool = False
    """`load_sharded` has already put the decoder weights and the saved EMAs in place."""
    sharded_emas: Sequence[str] = ()
    """EMAs (by U-Net number) a sharded save holds in its shard files, which `load_sharded` puts in place."""


def canonical(state: Mapping[str, Any]) -> Dict[str, Any]:
    """The parts' entries of a trainer state of any writer: moments saved by parameter name and
    schedulers saved as a step count join `optimizers` and `schedulers`, whose own entries win."""
    state = dict(state)
    state["optimizers"] = {**state.pop("optimizers_by_name", {}), **state.get("optimizers", {})}
    state["schedulers"] = {**state.pop("scheduler_steps", {}), **state.get("schedulers", {})}
    if state.get("sharded_loaded"):
        state.pop("decoder", None)
    return state


def restoring(state: Mapping[str, Any]) -> Restoring:
    return Restoring(
        saved_trained=[int(n) for n in state.get("trained_unets", [])],
        partial_decoder=bool(state.get("partial_decoder")),
        tensors_in_place=bool(state.get("sharded_loaded")),
        sharded_emas=list(state.get("sharded", {}).get("emas", [])),
    )


class _Part:
    def __init__(self, trainer: "DecoderTrainer") -> None:
        self.trainer = trainer


class ShardedLayout(_Part):
    """`sharded`: the format, file count and EMAs of a sharded save (its tensors are in shard files)."""

    def state_dict(self) -> Optional[Dict[str, Any]]:
        t = self.trainer
        if not t.sharded:
            return None
        return {"format": SHARDED_FORMAT, "files": t.accelerator.num_processes, "emas": [str(n) for n in t.emas]}

    def load_state_dict(self, state_dict: Any) -> None:
        """Nothing: a sharded checkpoint's tensors are read by `load_sharded`, a whole one's by the other parts."""


class DecoderWeights(_Part):
    """`decoder`: every U-Net's weights, whole (a sharded run's are in its shard files)."""

    def state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        t = self.trainer
        return None if t.sharded else {name: w.detach().cpu() for name, w in t.decoder.state_dict().items()}

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> List[str]:
        if self.trainer.restoring.partial_decoder:
            return load_present_unets(self.trainer, state_dict)
        load_whole(self.trainer, self.trainer.decoder, state_dict, source="checkpoint decoder weights")
        return []


class _WholePerUnet(_Part):
    """A state dict per trained U-Net, by U-Net number; none in a sharded save (its shard files hold them)."""

    def per_unet(self) -> Mapping[int, Any]:
        raise NotImplementedError

    def state_dict(self) -> Optional[Dict[str, Any]]:
        return None if self.trainer.sharded else {str(n): part.state_dict() for n, part in self.per_unet().items()}


class Optimizers(_WholePerUnet):
    """`optimizers`: each trained U-Net's AdamW state."""

    def per_unet(self) -> Mapping[int, torch.optim.Optimizer]:
        return self.trainer.optimizers

    def load_state_dict(self, state_dict: Optional[Mapping[str, Any]]) -> List[str]:
        t, saved, notes = self.trainer, state_dict or {}, []
        for number, optimizer in t.optimizers.items():
            entry = saved.get(str(number))
            try:
                if entry is None:
                    notes.append(
                        f"U-Net {number}: the checkpoint has no optimizer state for it (not trained there); "
                        "its optimizer starts fresh"
                    )
                elif "param_groups" not in entry:  # moments by parameter name
                    load_optimizer_by_name(t, number, entry)
                elif t.sharded:
                    load_optimizer_by_name(t, number, by_name(t, number, entry))
                else:
                    optimizer.load_state_dict(entry)
            except (ValueError, KeyError, RuntimeError) as error:
                optimizer.state.clear()
                notes.append(f"U-Net {number}: optimizer state not carried over ({error}); its optimizer starts fresh")
        return notes


class EMAs(_WholePerUnet):
    """`emas`: each trained U-Net's EMA (`averaged.*`, `num_updates`)."""

    def per_unet(self) -> Mapping[int, nn.Module]:
        return self.trainer.emas

    def load_state_dict(self, state_dict: Optional[Mapping[str, Any]]) -> List[str]:
        t, saved, notes = self.trainer, state_dict or {}, []
        in_shards = set(t.restoring.sharded_emas)
        for number, ema in t.emas.items():
            key = str(number)
            if t.restoring.tensors_in_place and key in in_shards:
                continue
            if key in saved:
                load_ema(t, number, saved[key])
                continue
            ema.copy_from(t.decoder.get_unet(number))
            if t.restoring.saved_trained:
                notes.append(f"U-Net {number}: no EMA in the checkpoint; the average starts from the loaded weights")
        dropped = sorted({int(n) for n in set(saved) | in_shards} & set(t.trained_unets) - set(t.emas))
        if dropped:
            notes.append(f"EMA state of U-Net(s) {', '.join(map(str, dropped))} not used: train.use_ema is false")
        return notes


class Schedulers(_Part):
    """`schedulers`: each trained U-Net's learning-rate schedule; loading applies the current config's
    learning rate, weight decay and Adam settings to the restored optimizers."""

    def state_dict(self) -> Dict[str, Any]:
        return {str(n): scheduler.state_dict() for n, scheduler in self.trainer.schedulers.items()}

    def load_state_dict(self, state_dict: Optional[Mapping[str, Any]]) -> None:
        t, saved = self.trainer, state_dict or {}
        for number, scheduler in t.schedulers.items():
            entry = saved.get(str(number))
            if isinstance(entry, Mapping):
                scheduler.load_state_dict(entry)
            elif entry is not None:  # a step count (DALLE2-pytorch's)
                scheduler.last_epoch = int(entry)
            t.apply_hyperparameters(number)


class Counters(_Part):
    """`counters`: optimizer steps, micro-batches and the non-finite steps."""

    def state_dict(self) -> Dict[str, int]:
        t = self.trainer
        return {
            "step": t.step,
            "micro_step": t.micro_step,
            "nonfinite_steps": t.nonfinite_steps,
            "nonfinite_streak": t.nonfinite_streak,
        }

    def load_state_dict(self, state_dict: Optional[Mapping[str, Any]]) -> None:
        t, counters = self.trainer, state_dict or {}
        t.step = int(counters.get("step", 0))
        t.micro_step = int(counters.get("micro_step", t.step * t.grad_accum))
        t.nonfinite_steps = int(counters.get("nonfinite_steps", 0))
        t.nonfinite_streak = int(counters.get("nonfinite_streak", 0))


class TrainedUnets(_Part):
    """`trained_unets`: the U-Nets the run trains, which a later run may change."""

    def state_dict(self) -> List[int]:
        return list(self.trainer.trained_unets)

    def load_state_dict(self, state_dict: Optional[Sequence[int]]) -> List[str]:
        frozen = sorted({int(n) for n in state_dict or []} - set(self.trainer.trained_unets))
        if not frozen:
            return []
        return [
            f"U-Net(s) {', '.join(map(str, frozen))}: frozen now (train.unet_training_mask); their weights "
            "are loaded, their optimizer and EMA states in the checkpoint are not used"
        ]


class PosthocProfiles(_Part):
    """`posthoc_ema`: the post-hoc EMA profiles, when the run keeps them."""

    def state_dict(self) -> Dict[str, Any]:
        return self.trainer.posthoc.state_dict()

    def load_state_dict(self, state_dict: Optional[Dict[str, Any]]) -> List[str]:
        t = self.trainer
        return t.posthoc.load_state_dict(state_dict, {number: t.decoder.get_unet(number) for number in t.trained_unets})


def register_parts(trainer: "DecoderTrainer", registry: StateRegistry) -> None:
    """The trainer's parts, in the file format's order (see the module docstring)."""
    registry.register("sharded", ShardedLayout(trainer))
    registry.register("decoder", DecoderWeights(trainer))
    registry.register("optimizers", Optimizers(trainer), load_absent=True)
    registry.register("emas", EMAs(trainer), load_absent=True)
    registry.register("schedulers", Schedulers(trainer), load_absent=True)
    registry.register("counters", Counters(trainer), load_absent=True)
    registry.register("trained_unets", TrainedUnets(trainer))
    if trainer.posthoc is not None:
        registry.register("posthoc_ema", PosthocProfiles(trainer), load_absent=True)
    if trainer.accelerator.scaler is not None:  # torch's GradScaler is itself Stateful
        registry.register("scaler", trainer.accelerator.scaler)


# --- loading tensors, whole or into shards ----------------------------------------------------------


def load_whole(
    trainer: "DecoderTrainer", module: nn.Module, weights: Mapping[str, torch.Tensor], *, source: str
) -> None:
    """Load whole tensors into `module`, which may hold sharded U-Nets (each process keeps its shards)."""
    if not trainer.sharded:
        load_state_dict_checked(module, weights, source=source)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    check_state_names(module, weights, source)
    set_model_state_dict(module, dict(weights), options=StateDictOptions(full_state_dict=True))


def load_ema(trainer: "DecoderTrainer", number: int, saved: Mapping[str, torch.Tensor]) -> None:
    """An EMA's whole state (`averaged.*`, `num_updates`) into EMA `number`, sharded or not."""
    ema = trainer.emas[number]
    if not trainer.sharded:
        ema.load_state_dict(saved)
        return
    prefix = "averaged."
    load_whole(
        trainer,
        ema.averaged,
        {name[len(prefix) :]: t for name, t in saved.items() if name.startswith(prefix)},
        source=f"checkpoint EMA of U-Net {number}",
    )
    if "num_updates" in saved:
        ema.num_updates.copy_(saved["num_updates"])
    ema._count = None


def load_present_unets(trainer: "DecoderTrainer", weights: Mapping[str, torch.Tensor]) -> List[str]:
    """Load the U-Nets a (DALLE2-pytorch) checkpoint holds; the others keep their weights, with a note."""
    notes = []
    for number, unet in enumerate(trainer.decoder.unets, start=1):
        prefix = f"unets.{number - 1}."
        own = {name[len(prefix) :]: tensor for name, tensor in weights.items() if name.startswith(prefix)}
        if own:
            load_whole(trainer, unet, own, source=f"checkpoint weights of U-Net {number}")
        else:
            notes.append(
                f"U-Net {number}: not in the checkpoint (the run that wrote it did not train it); "
                "it keeps its initial weights"
            )
    known = tuple(f"unets.{index}." for index in range(trainer.num_unets))
    extra = sorted({name.split(".")[1] for name in weights if not name.startswith(known) and name.startswith("unets.")})
    if extra:
        raise CheckpointError(
            f"the checkpoint has weights of U-Net(s) {', '.join(str(int(i) + 1) for i in extra)}, "
            f"but the configured decoder has {trainer.num_unets}"
        )
    return notes


def parameter_names(trainer: "DecoderTrainer", number: int) -> List[str]:
    """Names (in the U-Net) of the parameters of U-Net `number`'s optimizer, in its order."""
    by_param = {id(p): name for name, p in trainer.decoder.get_unet(number).named_parameters()}
    return [by_param[id(p)] for group in trainer.optimizers[number].param_groups for p in group["params"]]


def by_name(trainer: "DecoderTrainer", number: int, saved: Mapping[str, Any]) -> Dict[str, Any]:
    """An optimizer state dict saved by index (a whole checkpoint's) keyed by parameter name instead."""
    names = parameter_names(trainer, number)
    saved_count = sum(len(group["params"]) for group in saved.get("param_groups", []))
    if saved_count != len(names):
        raise ValueError(f"the checkpoint's optimizer has {saved_count} parameters, this U-Net's {len(names)}")
    order = [index for group in saved["param_groups"] for index in group["params"]]
    position = {index: at for at, index in enumerate(order)}
    return {"state": {names[position[index]]: entry for index, entry in saved.get("state", {}).items()}}


def load_optimizer_by_name(trainer: "DecoderTrainer", number: int, saved: Mapping[str, Any]) -> None:
    """Restore Adam moments saved per parameter name (converted from DALLE2-pytorch), in our order."""
    unet = trainer.decoder.get_unet(number)
    optimizer = trainer.optimizers[number]
    by_param = {id(p): name for name, p in unet.named_parameters()}
    names = [by_param[id(p)] for group in optimizer.param_groups for p in group["params"]]
    unknown = sorted(set(saved["state"]) - set(names))
    if unknown:
        raise KeyError(f"moments saved for {len(unknown)} parameter(s) this U-Net does not have, e.g. {unknown[0]}")
    # Parameters without saved moments (never given a gradient there) start theirs at zero.
    per_name = dict(saved["state"])
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = per_name.get(by_param[id(p)])
            if entry is not None and tuple(entry["exp_avg"].shape) != tuple(p.shape):
                raise ValueError(
                    f"moments of {by_param[id(p)]} have shape {tuple(entry['exp_avg'].shape)}, "
                    f"the parameter {tuple(p.shape)}"
                )
            if entry is not None and trainer.sharded:
                per_name[by_param[id(p)]] = {key: _like(value, p) for key, value in entry.items()}
    # The usual loader casts and places each state like its parameter (the step stays a CPU tensor).
    starts = [0]
    for group in optimizer.param_groups:
        starts.append(starts[-1] + len(group["params"]))
    optimizer.load_state_dict(
        {
            "state": {index: per_name[name] for index, name in enumerate(names) if name in per_name},
            "param_groups": [
                {**{k: v for k, v in group.items() if k != "params"}, "params": list(range(start, end))}
                for group, start, end in zip(optimizer.param_groups, starts, starts[1:])
            ],
        }
    )


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


# --- sharded checkpoints ----------------------------------------------------------------------------


def sharded_tensors(trainer: "DecoderTrainer") -> Dict[str, torch.Tensor]:
    """The tensors of the trainer state by `tracking.sharded` key: shards (DTensors) of the trained
    U-Nets, their optimizer moments and EMAs, whole tensors of the rest. Every process holds
    the same keys; none gathers anything."""
    tensors = {f"decoder/{name}": t.detach() for name, t in trainer.decoder.state_dict().items()}
    for number, ema in trainer.emas.items():
        tensors.update({f"emas/{number}/{name}": t.detach() for name, t in ema.state_dict().items()})
    for number, optimizer in trainer.optimizers.items():
        names = parameter_names(trainer, number)
        for index, entry in optimizer.state_dict()["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizers/{number}/{names[index]}/{key}"] = value
    return tensors


def load_sharded(trainer: "DecoderTrainer", folder, state: Dict[str, Any]) -> List[str]:
    """Restore a sharded checkpoint into a sharded trainer (every process together): each process
    reads the parts of the shard files its own shards cover, whatever the number of processes
    that wrote them. `state`: the checkpoint's trainer state (`checkpoint.pt`)."""
    from pathlib import Path

    from ..tracking.sharded import load_into, stored_shapes

    folder = Path(folder)
    shapes = stored_shapes(folder)
    targets = {f"decoder/{name}": t for name, t in trainer.decoder.state_dict().items()}
    _check_stored(folder, "decoder/", targets, shapes)
    moments: Dict[int, Dict[str, Dict[str, torch.Tensor]]] = {}
    for number, ema in trainer.emas.items():
        own = {f"emas/{number}/{name}": t for name, t in ema.state_dict().items()}
        if all(key in shapes for key in own):
            targets.update(own)
    for number in trainer.trained_unets:
        prefix = f"optimizers/{number}/"
        parameters = dict(trainer.decoder.get_unet(number).named_parameters())
        for key, shape in shapes.items():
            if not key.startswith(prefix):
                continue
            name, _, entry = key[len(prefix) :].rpartition("/")
            parameter = parameters.get(name)
            if parameter is None:
                continue  # reported by the moments' own check
            target = torch.empty_like(parameter) if tuple(shape) == tuple(parameter.shape) else torch.zeros(shape)
            moments.setdefault(number, {}).setdefault(name, {})[entry] = target
            targets[key] = target
    load_into(folder, targets)
    for ema in trainer.emas.values():
        ema._count = None  # the loaded `num_updates` is read at the next update
    saved = {str(n): {"state": entries} for n, entries in moments.items()}
    return trainer.load_state_dict({**state, "optimizers_by_name": saved, "sharded_loaded": True})


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
