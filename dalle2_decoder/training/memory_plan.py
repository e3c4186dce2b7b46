"""The memory plan: what each process holds for each U-Net while training, under DDP and under FSDP.

`train_decoder.py --check` prints it for the launch's process count (`memory_plan_lines`). Per
trained U-Net of P parameters, in bytes per process:

                DDP                       FSDP over N processes (shard group of N / replicas)
    weights     4P (+ 2P in bf16 / fp16)  4P / N + the gathered weights of the two largest blocks
    gradients   4P + 4P (DDP's buckets)   4P / N + the whole gradients of the largest block
    optimizer   8P (AdamW's two moments)  8P / N
    EMA         4P (when train.use_ema)   4P / N
    activations A                         A

    sampling    weights, gradients,       4P / N + 8P / N + EMA + the whole U-Net gathered (2P in
                optimizer and EMA         bf16, else 4P), no gradients, no activations

The last row is the peak of the phases that only run forward passes (sample grids, validation,
evaluation): FSDP gathers each sampled U-Net whole once for the phase, not block by block for
each of the sampler's steps (`sharding.gathered`), and the gradients were freed by the optimizer
step before it; DDP keeps its gradient buckets. The verdict takes the larger of the two peaks.

The block terms are FSDP's working set: a block's weights are gathered just before it runs and
freed after it (the next block's gather overlaps), and a block's whole gradients live until they
are reduce-scattered. Gathered weights are bf16 under bf16 mixed precision, fp32 otherwise. DDP
keeps the gradients twice: in the parameters' `.grad` and in its flat all-reduce buckets; under
autocast it also holds a 16-bit copy of every weight from the forward pass to the backward pass.

A (activations) is measured, not guessed: the U-Net runs one forward pass on the meta device (no
memory, shapes only) for the batch of one process at its image size, and the tensors autograd
saves for the backward pass are summed, but the U-Net's own parameters that layers save (counted
as weights above; under FSDP, gathered and freed with their block), halved under bf16 or fp16
autocast, which saves most of them in 16 bits. With activation checkpointing (a U-Net's
`checkpoint_during_training`, or the launcher's `fsdp_activation_checkpointing`) the checkpointed
blocks save only their inputs, and the backward pass recomputes one block at a time: A is then
what the forward pass saves plus the saved tensors of the largest block.

Frozen U-Nets are whole on every process in both modes (weights only; training never runs them).
The plan leaves out what does not grow with the model: the torch runtime (a few hundred MB on the
CPU, more with CUDA's context), data batches and loader workers (separate processes).

The plan counts tensors, not what an allocator keeps beside them. On the CPU that matters under
FSDP: glibc's malloc raises its mmap threshold to the largest block it has unmapped (up to 32 MiB),
and FSDP frees block-sized buffers (gathered weights, whole gradients) for every block, so the
activations and smaller blocks' buffers come from the heap afterwards, whose freed pages stay
resident and fragment: measured, a CPU FSDP process then peaked 33 to 58% above the plan
(bench/memory.py, docs/PERFORMANCE.md); with the threshold fixed (`MALLOC_MMAP_THRESHOLD_=131072`),
within 5% from 15M parameters up. The tensors FSDP holds are the ones modelled above (a profile of
the step's allocations found the same live peak as DDP's).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import weakref
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import attrs
import torch

FP32 = 4
"""Bytes of a float32 (weights, gradients, Adam moments and EMA are kept in fp32 in both modes)."""

PARTS = ("weights", "gradients", "optimizer", "ema", "activations")


@attrs.frozen
class UnetShape:
    """What the plan needs of one U-Net: its parameter count, its largest blocks, its activations."""

    number: int
    parameters: int
    largest_blocks: Sequence[int]
    """Parameters of its largest ResNet or attention blocks (the units FSDP gathers), largest first."""
    activations: int
    """Bytes autograd saves in one training forward pass of one process's batch (fp32)."""
    trained: bool


@attrs.frozen
class UnetMemory:
    """Bytes per process for one U-Net, by part."""

    number: int
    trained: bool
    weights: int
    gradients: int
    optimizer: int
    ema: int
    activations: int
    sampling: int = 0
    """Bytes while a sampling phase runs (sample grids, validation, evaluation); see the module doc."""

    @property
    def total(self) -> int:
        """Bytes while training (the sum of `PARTS`)."""
        return sum(getattr(self, part) for part in PARTS)


def shard_count(processes: int, replicas: int = 1) -> int:
    """Processes one shard group splits a U-Net across (all of them for FULL_SHARD)."""
    return max(1, processes // max(1, replicas))


def unet_memory(
    shape: UnetShape, *, sharded: bool, processes: int, replicas: int = 1, use_ema: bool = True, precision: str = "no"
) -> UnetMemory:
    """One U-Net's bytes per process (see the module doc for each term)."""
    p = shape.parameters
    if not shape.trained:
        return UnetMemory(shape.number, False, FP32 * p, 0, 0, 0, 0, sampling=FP32 * p)
    activations = shape.activations // 2 if precision in ("bf16", "fp16") else shape.activations
    if not sharded:
        # autocast's 16-bit copies of the weights live through the forward pass (its cache) and the
        # layers save them for the backward pass (FSDP gathers 16-bit weights per block instead)
        copies = 2 * p if precision in ("bf16", "fp16") else 0
        ema = FP32 * p if use_ema else 0
        return UnetMemory(
            shape.number,
            True,
            FP32 * p + copies,
            2 * FP32 * p,
            2 * FP32 * p,
            ema,
            activations,
            sampling=FP32 * p + FP32 * p + 2 * FP32 * p + ema,  # the buckets stay; .grad is freed
        )
    n = shard_count(processes, replicas)
    shard = math.ceil(p / n)
    gathered = 2 if precision == "bf16" else FP32
    blocks = list(shape.largest_blocks) + [0, 0]
    working_weights = gathered * (blocks[0] + blocks[1]) if n > 1 else 0
    working_grads = FP32 * blocks[0] if n > 1 else 0
    ema = FP32 * shard if use_ema else 0
    whole = gathered * p if n > 1 else 0
    return UnetMemory(
        shape.number,
        True,
        FP32 * shard + working_weights,
        FP32 * shard + working_grads,
        2 * FP32 * shard,
        ema,
        activations,
        sampling=FP32 * shard + 2 * FP32 * shard + ema + whole,
    )


# --- shapes from a config (meta device: no memory) ------------------------------------------------


class _SavedTensors:
    """The tensors autograd saves inside `hooks()`, held weakly: those alive when counted (the output
    of the forward pass still held) are what its backward pass needs; a branch whose graph was
    dropped frees its own. `packed` counts every saved byte, alive or not."""

    def __init__(self, parameters: Iterable[torch.Tensor] = ()) -> None:
        self.refs: Dict[int, weakref.ref] = {}
        self.packed = 0
        self.parameters = {id(parameter) for parameter in parameters}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        # The weights a layer saves (a convolution's, a linear layer's transposed view) are the
        # parameters themselves, counted as weights (DDP) or freed after each block (FSDP).
        if id(tensor) in self.parameters or id(tensor._base) in self.parameters:
            return tensor
        self.refs[id(tensor)] = weakref.ref(tensor)  # an id is reused only once its tensor is gone
        self.packed += tensor.numel() * tensor.element_size()
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    def alive_bytes(self) -> int:
        alive = (ref() for ref in self.refs.values())
        return sum(tensor.numel() * tensor.element_size() for tensor in alive if tensor is not None)


def activation_bytes(unet, *, batch_size: int, image_size: int, image_embed_dim: int, lowres: bool) -> int:
    """Bytes autograd keeps for the backward pass of one forward pass of `unet` (on the meta device).

    Every tensor autograd saves through the forward pass, but the U-Net's own parameters. With activation checkpointing
    (`unet.checkpoint_during_training`) a block run under `torch.utils.checkpoint` saves only its
    inputs (to run it again), and its own saved tensors exist while the backward pass recomputes it,
    one block at a time: the largest of those is added.
    """
    parameters = list(unet.parameters())
    saved = _SavedTensors(parameters)
    largest_recomputed = 0

    # The U-Net runs each block through the function its `_runner` returns (checkpointed or not).
    runner = unet._runner

    def counting_runner(disable_checkpoint: bool):
        run = runner(disable_checkpoint)

        def counted(module, *args):
            nonlocal largest_recomputed
            before = saved.packed
            output = run(module, *args)
            plain = _SavedTensors(parameters)
            with plain.hooks():
                plain_output = module(*args)  # what the block saves when run plainly (meta: no memory)
                recomputed = plain.alive_bytes()
            del plain_output
            if saved.packed - before < plain.packed:  # it saved less: checkpointed, recomputed in backward
                largest_recomputed = max(largest_recomputed, recomputed)
            return output

        return counted

    channels = getattr(unet, "channels", 3)
    unet._runner = counting_runner
    try:
        with torch.device("meta"), saved.hooks():
            image = torch.empty(batch_size, channels, image_size, image_size)
            options = {"image_embed": torch.empty(batch_size, image_embed_dim)}
            if lowres:
                options["lowres_cond_img"] = torch.empty(batch_size, channels, image_size, image_size)
            unet.train()
            output = unet(image, torch.zeros(batch_size, dtype=torch.long), **options)
            activations = saved.alive_bytes()
            del output
    finally:
        del unet._runner
    return activations + largest_recomputed


@contextlib.contextmanager
def unets_on_meta() -> Iterator[None]:
    """Inside it, U-Nets are built on the meta device (shapes only) and the rest as usual: the
    Decoder, which recasts its U-Nets for their place in the cascade, computes its schedules on
    real tensors."""
    from ..models.unet import Unet

    real_init = Unet.__init__

    @functools.wraps(real_init)
    def meta_init(self, *args, **kwargs) -> None:
        with torch.device("meta"):
            real_init(self, *args, **kwargs)

    Unet.__init__ = meta_init  # type: ignore[method-assign]
    try:
        yield
    finally:
        Unet.__init__ = real_init  # type: ignore[method-assign]


def unet_shapes(config, *, batch_size: Optional[int] = None, activation_checkpointing: bool = False) -> List[UnetShape]:
    """Each U-Net of `config` (a `TrainDecoderConfig`) as its Decoder builds it, on the meta device.

    Activations follow each U-Net's `checkpoint_during_training`; `activation_checkpointing` (the
    launcher's, which the trainer turns on for every trained U-Net under FSDP) turns it on for all.
    """
    from .sharding import blocks

    batch = batch_size if batch_size is not None else config.data.batch_size
    with unets_on_meta():
        unets = list(config.decoder.create().unets)
    shapes = []
    for index, (unet_config, unet) in enumerate(zip(config.decoder.unets, unets)):
        block_sizes = sorted((sum(p.numel() for p in block.parameters()) for block in blocks(unet)), reverse=True)
        trained = config.train.trains_unet(index + 1)
        if activation_checkpointing:
            unet.checkpoint_during_training = True
        activations = (
            activation_bytes(
                unet,
                batch_size=batch,
                image_size=config.decoder.image_sizes[index],
                image_embed_dim=unet_config.image_embed_dim,
                lowres=index > 0,
            )
            if trained
            else 0
        )
        shapes.append(
            UnetShape(
                number=index + 1,
                parameters=sum(p.numel() for p in unet.parameters()),
                largest_blocks=tuple(block_sizes[:2]),
                activations=activations,
                trained=trained,
            )
        )
    return shapes


# --- the printed plan ------------------------------------------------------------------------------


def device_memory() -> Optional[tuple]:
    """(bytes one process may use, what they are): a GPU's memory, or this machine's RAM shared by
    the launch's processes on it; None when unknown."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, f"GPU ({torch.cuda.get_device_name(0)})"
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return pages // max(1, local), f"RAM / {local} process(es) on this machine"


def gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**28 else f"{count / 2**20:.1f} MiB"


def memory_plan_lines(
    config,
    *,
    processes: int,
    replicas: int = 1,
    precision: str = "no",
    available: Optional[tuple] = None,
    activation_checkpointing: bool = False,
) -> List[str]:
    """The plan as printed by `--check`: one line per U-Net and mode, then a verdict per mode."""
    shapes = unet_shapes(config, activation_checkpointing=activation_checkpointing)
    lines = [
        f"memory plan per process ({processes} process(es), batch {config.data.batch_size} per process, "
        f"precision {precision}; see docs/TRAINING.md, The memory plan):"
    ]
    totals = {}
    for label, sharded in (("DDP", False), ("FSDP", True)):
        total = sampling = 0
        for shape in shapes:
            memory = unet_memory(
                shape,
                sharded=sharded,
                processes=processes,
                replicas=replicas,
                use_ema=config.train.use_ema,
                precision=precision,
            )
            total += memory.total
            sampling += memory.sampling
            state = "trained" if shape.trained else "frozen, whole"
            parts = ", ".join(f"{part} {gib(getattr(memory, part))}" for part in PARTS if getattr(memory, part))
            lines.append(
                f"  {label:4} U-Net {shape.number} ({shape.parameters / 1e6:.1f}M parameters, {state}): "
                f"{parts}; total {gib(memory.total)}"
            )
        if sharded:
            lines.append(
                f"  {label:4} sample grids, validation, evaluation: each trained U-Net gathered whole for the phase; "
                f"{gib(sampling)} in all"
            )
        totals[label] = max(total, sampling)
    for label, total in totals.items():
        if available is None:
            lines.append(f"  {label}: {gib(total)} per process (device memory unknown)")
        elif total <= available[0]:
            lines.append(f"  {label}: {gib(total)} per process fits in {gib(available[0])} ({available[1]})")
        else:
            lines.append(
                f"  warning: {label}: {gib(total)} per process does not fit in {gib(available[0])} ({available[1]})"
            )
    return lines
