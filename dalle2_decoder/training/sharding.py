"""Sharded training (FSDP2): trained U-Nets and their EMAs split across processes, block by block.

`shard_unet` calls `torch.distributed.fsdp.fully_shard` on each ResNet block and each attention
block of a U-Net, then on the U-Net itself (which keeps the few layers outside any block: the
first convolution, the conditioning projections, the output layer), as torchtitan does for
transformer blocks. Each block's weights are gathered just before it runs and freed after it, so
a process holds its own shards plus about one block's full weights at a time.

The EMA of a U-Net is a copy sharded the same way, so each process averages its own shards
(`local` views, no communication). The phases that only sample or evaluate gather a U-Net's
weights once for the whole phase (`gathered`), not block by block for every sampler step. Frozen
U-Nets are never sharded. Mixed precision follows FSDP's policy: bf16 weights for compute,
gradients reduced in fp32, fp32 master weights and optimizer state.

Every process must take part in every forward pass of a sharded U-Net (training, validation,
evaluation, sample grids): the training loop already runs every phase on every rank.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, List, Optional

import torch
from torch import nn

from ..models.attention import Residual
from ..models.layers import ResnetBlock
from ..runtime import Sharding

BLOCK_TYPES = (ResnetBlock, Residual)
"""The units each sharded U-Net is wrapped in: ResNet blocks and residual attention blocks."""


def device_mesh(sharding: Sharding, device: torch.device, processes: int):
    """The mesh the U-Nets are sharded over: 1-D (FULL_SHARD) or (replicate, shard) (HYBRID_SHARD)."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = sharding.mesh_shape(processes)
    names = ("shard",) if len(shape) == 1 else ("replicate", "shard")
    return init_device_mesh(device.type, shape, mesh_dim_names=names)


def precision_policy(mixed_precision: str):
    """FSDP's mixed precision: bf16 compute with fp32 master weights and fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def blocks(unet: nn.Module) -> List[nn.Module]:
    """The outermost ResNet and attention blocks of a U-Net, in module order."""
    found: List[nn.Module] = []

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, BLOCK_TYPES):
                found.append(child)
            else:
                walk(child)

    walk(unet)
    return found


def shard_unet(unet: nn.Module, mesh, *, sharding: Sharding, mixed_precision: str) -> nn.Module:
    """Shard `unet` in place: each block, then the U-Net; returns it (now also an `FSDPModule`).

    The U-Net's guided forward (`forward_with_cond_scale`, which sampling calls) is registered
    with FSDP, so it gathers the weights as `forward` does.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    policy = precision_policy(mixed_precision)
    for block in blocks(unet):
        fully_shard(block, mesh=mesh, reshard_after_forward=sharding.reshard_after_forward, mp_policy=policy)
    # The U-Net's own layers run first and last; gathered once per forward (never freed between
    # forward and backward, as fully_shard's default does for the outermost module).
    fully_shard(unet, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(unet, "forward_with_cond_scale")
    return unet


def release_freed_memory(device: torch.device) -> None:
    """Give back to the system the memory of the whole U-Nets and EMAs that sharding freed.

    Each U-Net is built whole, then split; without this, the allocator keeps the whole copies'
    pages (CUDA's caching allocator; on the CPU, glibc's heap, whose freed chunks are not
    returned while anything above them lives), and a process's footprint stays that of the whole
    model. `malloc_trim` is glibc's; elsewhere nothing is done on the CPU.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is not None:
        trim(0)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (a view: writing it writes the parameter); others as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's whole value on every process (a collective); other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@contextlib.contextmanager
def gradient_sync(modules: Iterable[nn.Module], enabled: bool) -> Iterator[None]:
    """Accumulate gradients locally (no reduce-scatter) inside it when not `enabled`."""
    sharded = [module for module in modules if is_sharded(module)]
    if enabled or not sharded:
        yield
        return
    for module in sharded:
        module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for module in sharded:
            module.set_requires_gradient_sync(True)


@contextlib.contextmanager
def gathered(modules: Iterable[Optional[nn.Module]], reshard_after_forward: bool) -> Iterator[None]:
    """Inside it, each sharded U-Net of `modules` keeps its weights gathered from the first forward
    pass that gathers them to the end; on the way out they are freed and the U-Net's blocks reshard
    after forward again as configured (`reshard_after_forward`; the U-Net's own layers: never, as
    fully_shard leaves the outermost module).

    For the phases that only run forward passes (sample grids, validation, evaluation): a sampler
    calls each U-Net 20 to 1,000 times, and gathering every block's weights for every call is that
    many all-gathers of the whole U-Net; here it is one. The cost is memory: the whole U-Net's
    weights (in the compute dtype) on every process while the phase runs, which the memory plan
    counts (`memory_plan.py`)."""
    sharded = [module for module in modules if module is not None and is_sharded(module)]
    for module in sharded:
        module.set_reshard_after_forward(False)  # recursive: the U-Net and every block
    try:
        yield
    finally:
        for module in sharded:
            for block in blocks(module):
                if is_sharded(block):
                    block.set_reshard_after_forward(reshard_after_forward, recurse=False)
        reshard(sharded)


def reshard(modules: Iterable[Optional[nn.Module]]) -> None:
    """Free the gathered weights of each sharded U-Net of `modules` and of its blocks (FSDP keeps
    them after a forward pass without backward, and `gathered` keeps them on purpose)."""
    for module in modules:
        if module is None or not is_sharded(module):
            continue
        for part in module.modules():  # FSDPModule.reshard is not recursive
            if is_sharded(part):
                part.reshard()
