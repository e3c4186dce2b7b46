"""The process's runtime: the Accelerator and its process group, from start to shut-down.

- `create_run(config)`: the run's context (`RunContext`): an Accelerator honouring `train.device` in
  a single process and the launcher (`accelerate launch`, torchrun, SLURM) otherwise, with DDP's
  options, the sharding the launch asks for and, on the CPU, a compute-thread policy
  (`ComputeThreads`); `create_accelerator(config)` gives its accelerator alone;
- `shut_down(accelerator)`: the clean end of a multi-process run;
- `lost_peers_reported()`: the error a collective raises when another process died becomes one
  `PeerLostError` line (exit status 5) instead of a traceback;
- `ddp_ignore(module, names)`: parameters and buffers DistributedDataParallel must leave alone;
- `Sharding` / `sharding_from_launcher()`: sharded training (FSDP2) when the launch config asks for
  it (`accelerate launch --config_file accelerate_configs/fsdp.yaml`), as `RunContext.sharding`.

CPU compute threads from what the data workers actually use: on the CPU, torch's compute threads
and the dataloader workers share the cores this process may use. A fixed split (one core per
worker) leaves a core idle whenever the workers wait, which with decoded-once shards is most of
the time: on 2 cores with 1 worker, one compute thread made a 2-epoch 64px run 1.6x slower than
two. So the run starts with every core for compute, measures the CPU time its workers really take
(from /proc, every few steps), and gives up one compute thread for each core's worth the workers
keep busy; it takes them back when the workers use less. `OMP_NUM_THREADS` set by the user turns
all of this off.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple

import attrs
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn

from .config.root import TrainDecoderConfig
from .failures import EXIT_CONFIG, EXIT_IO

# --- CPU compute threads -----------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def children_cpu_seconds(pid: Optional[int] = None) -> Optional[Dict[int, float]]:
    """CPU seconds (user + system) of each live child of `pid` (this process), or None without /proc."""
    parent = os.getpid() if pid is None else pid
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    found: Dict[int, float] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state, ppid, ..., utime (14th field overall) and stime (15th).
        if int(fields[1]) == parent:
            found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / _TICKS
    return found


class ComputeThreads:
    """Chooses `torch.set_num_threads` for one training process on the CPU.

    `cores`: the cores this process may use (its share when several processes run on one node).
    Call `update()` from the training thread every few steps (torch's thread count is per thread).
    """

    HYSTERESIS = 0.15
    """Cores' worth of worker use beyond the half-way point before a thread is given up or taken back."""

    def __init__(self, cores: int) -> None:
        self.cores = max(1, cores)
        self.threads = self.cores
        self.worker_cores = 0.0
        """Cores' worth of CPU the workers used in the last window."""
        self._last: Optional[tuple] = None

    def start(self) -> int:
        torch.set_num_threads(self.threads)
        self._last = None
        return self.threads

    def update(self) -> Optional[int]:
        """Measure the workers since the last call; returns the new thread count when it changed."""
        now, usage = time.monotonic(), children_cpu_seconds()
        if usage is None:
            return None
        last, self._last = self._last, (now, usage)
        if last is None or now - last[0] <= 0:
            return None
        before = last[1]
        # Workers started since the last call (a new epoch) count from zero.
        used = sum(max(0.0, seconds - before.get(pid, 0.0)) for pid, seconds in usage.items())
        self.worker_cores = used / (now - last[0])
        threads = threads_for(self.cores, self.threads, self.worker_cores, self.HYSTERESIS)
        if threads == self.threads:
            return None
        self.threads = threads
        torch.set_num_threads(threads)
        return threads


def threads_for(cores: int, threads: int, worker_cores: float, margin: float = ComputeThreads.HYSTERESIS) -> int:
    """Compute threads for `cores` cores when the workers keep `worker_cores` cores' worth busy.

    The k-th core is given up once the workers use more than k - 0.5 (+ margin) cores and taken
    back below k - 0.5 (- margin): a compute thread that shares its core with a busy worker stalls
    the other threads at every synchronisation, while a worker that is mostly idle costs little.
    """
    reserved = cores - threads
    if worker_cores > reserved + 0.5 + margin:
        reserved = math.floor(worker_cores + 0.5 - margin)
    elif worker_cores < reserved - 0.5 - margin:
        reserved = max(0, math.floor(worker_cores + 0.5 + margin))
    return max(1, cores - reserved)


def compute_threads_for(device_type: str, local_processes: int) -> Optional[ComputeThreads]:
    """The policy for this process, or None (not on the CPU, or OMP_NUM_THREADS chosen by the user)."""
    if device_type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    return ComputeThreads(available_cores() // max(1, local_processes))


# --- the accelerator ---------------------------------------------------------------------------


def launched() -> bool:
    """True under `accelerate launch` / torchrun, where the launcher chooses the device."""
    return (
        int(os.environ.get("WORLD_SIZE", "1")) > 1
        or "ACCELERATE_MIXED_PRECISION" in os.environ
        and "LOCAL_RANK" in os.environ
    )


@contextlib.contextmanager
def _parallelism_config_hidden(cpu: bool) -> Iterator[None]:
    """On the CPU, the Accelerator is built without the launcher's `parallelism_config`.

    Accelerate refuses a parallelism config on the CPU (it runs FSDP launches there as MULTI_CPU);
    the package shards the U-Nets itself and reads that config on its own (`sharding_from_launcher`,
    HYBRID_SHARD's replicas), so hiding it from the Accelerator loses nothing. Elsewhere unchanged.
    """
    name = "ACCELERATE_USE_PARALLELISM_CONFIG"
    saved = os.environ.get(name)
    if not cpu or saved is None:
        yield
        return
    os.environ[name] = "false"
    try:
        yield
    finally:
        os.environ[name] = saved


@attrs.frozen
class RunContext:
    """What a run's processes are given at start-up, besides the config: built once by `create_run`."""

    accelerator: Accelerator
    """The process's Accelerator (device, process group, mixed precision)."""
    sharding: Optional["Sharding"] = None
    """How trained U-Nets are sharded, when the launch asks for FSDP (`sharding_from_launcher`); None: DDP."""
    compute_threads: Optional[ComputeThreads] = None
    """The CPU compute-thread policy the training loop updates every few steps; None off the CPU or
    when the user set OMP_NUM_THREADS."""


def create_accelerator(config: TrainDecoderConfig, *, purpose: str = "training") -> Accelerator:
    """The accelerator of `create_run(config, purpose=purpose)`, for commands that need nothing else."""
    return create_run(config, purpose=purpose).accelerator


def create_run(config: TrainDecoderConfig, *, purpose: str = "training") -> RunContext:
    """The run's context: an Accelerator honouring `train.device` in single-process runs and the
    launcher otherwise, the sharding the launch asks for, and on the CPU the compute-thread policy
    (started here). `purpose` names the run in the notes printed (`training`, `evaluation`).
    """
    train = config.train
    # As in DALLE2-pytorch, `train.amp` chooses nothing: without `mixed_precision`, accelerate's
    # launch configuration (ACCELERATE_MIXED_PRECISION) decides, and plain fp32 without one.
    precision = train.mixed_precision
    notes = []
    static_graph, why_not = ddp_static_graph(config)
    if why_not and launched():
        notes.append(why_not)
    ddp = DistributedDataParallelKwargs(
        find_unused_parameters=train.find_unused_parameters, static_graph=static_graph, broadcast_buffers=False
    )
    if launched():
        # Without GPUs (or when the launcher asks for the CPU) each process must say so itself,
        # otherwise Accelerate treats the processes as independent single-process runs.
        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        with _parallelism_config_hidden(cpu):
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
    sharding = sharding_from_launcher(accelerator.num_processes)
    if sharding is not None:
        check_sharded_precision(accelerator.mixed_precision)
        ensure_process_group(accelerator.device)
        notes.append(sharding.describe(accelerator.num_processes))
    # On the CPU, each process's share of the node's cores goes to compute, less what its data
    # workers turn out to use (measured during training, see `ComputeThreads`).
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    compute_threads = compute_threads_for(accelerator.device.type, local_processes)
    if compute_threads is not None:
        threads = compute_threads.start()
        notes.append(
            f"CPU {purpose} with {threads} compute thread(s) per process, one fewer per core the data "
            "workers keep busy (set OMP_NUM_THREADS to choose)"
        )
    for note in notes:
        if accelerator.is_main_process:
            print(f"note: {note}", flush=True)
    return RunContext(accelerator, sharding, compute_threads)


def ddp_static_graph(config: TrainDecoderConfig) -> Tuple[bool, Optional[str]]:
    """DDP's `static_graph` for this run, and why `train.static_graph` is not used, if it is not.

    A step runs one backward pass per trained U-Net through the one wrapped decoder, each using
    another U-Net's parameters: a static graph cannot take a used set that changes between passes
    (DDP stops with "Your training graph has changed"), so it is only used with one trained U-Net.
    """
    train = config.train
    trained = sum(1 for number in range(1, len(config.decoder.unets) + 1) if train.trains_unet(number))
    if train.static_graph and trained > 1:
        return False, (
            f"train.static_graph: not used with {trained} trained U-Nets (each one's backward pass uses "
            "other parameters, which a static DDP graph cannot take); set it to false to silence this"
        )
    return train.static_graph, None


def ddp_ignore(module: nn.Module, names: Sequence[str]) -> None:
    """Make DistributedDataParallel leave these parameters and buffers of `module` alone (no broadcast,
    no gradient all-reduce); call it before the module is wrapped.

    torch has no public API for this: DDP's constructor reads the list that its private static
    method `_set_params_and_buffers_to_ignore_for_model` stores on the module (a stop-gap, see
    https://github.com/pytorch/pytorch/issues/43690). This is the package's one use of it, and
    tests/test_runtime.py fails when torch renames it or stops honouring it.
    """
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, list(names))


# --- sharded training (FSDP2) ------------------------------------------------------------------


class ShardingSetupError(ValueError):
    """The launch configuration asks for sharding this package cannot do (one line, exit status 1)."""

    exit_status: ClassVar[int] = EXIT_CONFIG


@attrs.frozen
class Sharding:
    """How trained U-Nets are sharded, as the launcher's FSDP configuration says (`fsdp_config`).

    Parameters, gradients, optimizer state and EMA are split across the `shard` processes of
    each replica (FULL_SHARD); with `replicate` > 1 (HYBRID_SHARD, e.g. one replica per node) the
    shards are repeated across replicas, so only the gradients of equal shards cross nodes.
    """

    reshard_after_forward: bool = True
    """Free each block's gathered weights after its forward pass (FULL_SHARD); False keeps them until
    the backward pass (SHARD_GRAD_OP: more memory, one all-gather fewer)."""
    activation_checkpointing: bool = False
    """The launcher asks for activation checkpointing (`fsdp_activation_checkpointing`): it is then on
    for every trained U-Net, as `checkpoint_during_training` turns it on for one."""
    replicate: int = 1
    """Replicas (HYBRID_SHARD across this many groups, from accelerate's `parallelism_config`); 1: FULL_SHARD."""

    def mesh_shape(self, processes: int) -> Tuple[int, ...]:
        """The device mesh: (shard,) or (replicate, shard)."""
        if self.replicate <= 1:
            return (processes,)
        return (self.replicate, processes // self.replicate)

    def describe(self, processes: int) -> str:
        shape = self.mesh_shape(processes)
        how = (
            f"FULL_SHARD over {processes} process(es)"
            if len(shape) == 1
            else f"HYBRID_SHARD: {shape[0]} replicas of {shape[1]} shards"
        )
        after = "" if self.reshard_after_forward else ", weights kept gathered from forward to backward"
        return f"sharded training (FSDP2, {how}{after}): trained U-Nets, their optimizers and EMAs are split"


def sharding_from_launcher(processes: int) -> Optional[Sharding]:
    """The `Sharding` the launch configuration asks for (accelerate's FSDP settings), or None (DDP).

    `accelerate launch` with `distributed_type: FSDP` passes its `fsdp_config` to the processes;
    accelerate's own `FullyShardedDataParallelPlugin` and `ParallelismConfig` read it back, so the
    settings mean here what they mean to accelerate. The U-Nets are then sharded by this package
    (`training.sharding`), block by block, rather than by `Accelerator.prepare`: only trained
    U-Nets are sharded, together with their EMA, and each keeps its own optimizer.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ShardingSetupError(
            f"the launch configuration asks for FSDP version {plugin.fsdp_version}; this package shards with FSDP2: "
            "set fsdp_version: 2 in its fsdp_config (see accelerate_configs/fsdp.yaml)"
        )
    if plugin.cpu_offload is not None and getattr(plugin.cpu_offload, "offload_params", False):
        raise ShardingSetupError(
            "the launch configuration asks for fsdp_offload_params, which this package does not support: "
            "set it to false"
        )
    replicate = 1
    if os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false").lower() == "true":
        from accelerate.parallelism_config import ParallelismConfig

        parallel = ParallelismConfig()
        if parallel.tp_size > 1 or parallel.cp_size > 1:
            raise ShardingSetupError(
                "the launch configuration's parallelism_config asks for tensor or context parallelism; this package "
                "shards data-parallel only: set parallelism_config_tp_size and parallelism_config_cp_size to 1"
            )
        replicate = max(1, parallel.dp_replicate_size)
        if replicate > 1 and replicate * max(1, parallel.dp_shard_size) != processes:
            raise ShardingSetupError(
                f"parallelism_config: dp_replicate_size {replicate} x dp_shard_size {parallel.dp_shard_size} is not "
                f"the {processes} processes launched"
            )
    after = plugin.reshard_after_forward
    return Sharding(
        reshard_after_forward=after if isinstance(after, bool) else str(after).upper() != "SHARD_GRAD_OP",
        activation_checkpointing=bool(plugin.activation_checkpointing),
        replicate=replicate,
    )


def check_sharded_precision(mixed_precision: str) -> None:
    """Sharded runs compute in bf16 or fp32: fp16 needs a loss scaler FSDP2 does not offer here."""
    if mixed_precision == "fp16":
        raise ShardingSetupError(
            "sharded training (FSDP) runs in bf16 or fp32; fp16 is not supported: set train.mixed_precision (or the "
            "launch's mixed_precision) to bf16 or no"
        )


def ensure_process_group(device: torch.device) -> None:
    """Sharding needs a process group, also in a single process (which accelerate leaves without one):
    a one-process group over an in-memory store, no port needed."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ShardingSetupError("sharded training: the processes were started without a process group")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)


# --- the end of a run ---------------------------------------------------------------------------


def shut_down(accelerator: Accelerator) -> None:
    """End a multi-process run cleanly: all ranks meet, then the process group is destroyed.

    Without it, a rank may exit while the gloo/NCCL threads of its process group still run, and
    the C++ runtime aborts that process ("terminate called without an active exception").
    """
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        accelerator.end_training()


class PeerLostError(RuntimeError):
    """Another process of the run is gone (reported as one line, exit status 5: I/O or environment)."""

    exit_status: ClassVar[int] = EXIT_IO


_PEER_LOST_MARKERS: List[str] = ["Connection closed by peer", "Connection reset by peer", "NCCL", "gloo/transport"]


def lost_peer(error: BaseException) -> bool:
    """True for the error a collective raises when another rank is gone."""
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, getattr(dist, "DistError", ())) or any(marker in text for marker in _PEER_LOST_MARKERS)


@contextlib.contextmanager
def lost_peers_reported() -> Iterator[None]:
    """Inside it, the error of a collective whose peer died is raised as one `PeerLostError`.

    A node or process died: the collective it left fails here (gloo/NCCL close the connection)
    and this process ends too, with one line, instead of the launcher printing a child's traceback.
    """
    try:
        yield
    except RuntimeError as error:
        if not lost_peer(error):
            raise
        raise PeerLostError(
            "lost contact with another process of this run (a node or process died, or the network failed; see the "
            f"other nodes' logs). The last checkpoint is kept. {type(error).__name__}: {error}"
        ) from error
