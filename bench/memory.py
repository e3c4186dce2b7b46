"""The memory plan (`train_decoder.py --check`) against the measured peak of the trained state.

    python bench/memory.py [--steps 3] [--processes 2] [--configs small ...] [--malloc-default] [--profile]
    python bench/memory.py --plan [CFG.json ...] [--processes 8] [--precision bf16] [--batch-size 8]

`--plan` measures nothing: it prints the plan per process for the configs given (default: LAION's
published 1.5B_laion2B decoder, our 64px example and a 3.5B-parameter base U-Net, the size of the
unCLIP paper's decoder; its options below are ours, chosen for that count), under DDP and FSDP.

For each config (below: one U-Net each, from about 5M to 46M parameters, 121M for `parameters`, on
generated demo data) the training command runs under DDP and under FSDP with `--processes` CPU
processes (gloo) for `--steps` optimizer steps, then every process writes its numbers and leaves. Per process:
- baseline: resident memory (VmRSS) just before the decoder is built (torch and its distributed
  modules, the process group, the data loaders are in it);
- peak: the highest resident memory so far (VmHWM), read after the last step (before validation
  and sample grids, which hold less);
- trained state, measured = peak - baseline; planned = the plan's total for that mode
  (`training.memory_plan`: weights, gradients, optimizer, EMA, activations);
- also, before the first step: resident memory above the baseline (setup: the U-Nets, EMAs, and
  under FSDP their shards) and the peak so far above it (setup peak: FSDP builds each U-Net whole,
  then shards it).
On a GPU the same run reads `torch.cuda.max_memory_allocated` instead (not run here: no GPU).

The processes run with glibc's mmap threshold fixed (`MALLOC_MMAP_THRESHOLD_=131072`, unless
`--malloc-default`), so that the resident memory follows the tensors: by default glibc raises the
threshold to the largest block it has unmapped (up to 32 MiB), and FSDP frees a block-sized buffer
(gathered weights, whole gradients) for every block of every step; from the first one on, the
activations below that size come from the heap, whose freed pages stay resident and fragment, so the
peak resident memory then exceeds what the tensors ever held at once (docs/PERFORMANCE.md).
Figures go in docs/PERFORMANCE.md ("Memory plan against measured peaks").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EMBED_DIM = 64
CONFIGS = {
    "small": {"dim": 32, "dim_mults": [1, 2, 4], "image_size": 32, "batch_size": 4},
    "small-checkpointed": {"dim": 32, "dim_mults": [1, 2, 4], "image_size": 32, "batch_size": 4, "checkpoint": True},
    "medium": {"dim": 64, "dim_mults": [1, 2, 4], "image_size": 32, "batch_size": 2},
    "large": {"dim": 96, "dim_mults": [1, 2, 3, 4], "image_size": 32, "batch_size": 2},
    "parameters": {"dim": 160, "dim_mults": [1, 2, 3, 4], "image_size": 32, "batch_size": 1},
}
"""`small-checkpointed` is `small` with `checkpoint_during_training`. `parameters` (121M parameters,
batch 1: the state dwarfs the activations) is not run by default: about 3.5 GB per DDP process."""
DEFAULT_CONFIGS = ["small", "small-checkpointed", "medium", "large"]


UNCLIP_SIZED_UNET = {
    "dim": 704,
    "image_embed_dim": 768,
    "dim_mults": [1, 2, 3, 4],
    "num_resnet_blocks": 4,
    "cond_dim": 512,
    "attn_heads": 16,
    "attn_dim_head": 64,
    "self_attn": [False, True, True, True],
    "cond_on_text_encodings": True,
    "text_embed_dim": 768,
}
"""A base U-Net (64px) of 3.45B parameters."""

DEFAULT_PLAN_CONFIGS = [
    ROOT / "tests" / "fixtures" / "laion" / "1.5B_laion2B" / "decoder_config.json",
    ROOT / "example_configs" / "decoder_64_precomputed.json",
]


def plan_table(paths, *, processes: int, precision: str, batch_size: int) -> None:
    import attrs

    from dalle2_decoder import TrainDecoderConfig
    from dalle2_decoder.training.memory_plan import PARTS, unet_memory, unet_shapes

    configs = [(f"{Path(p).parent.name}/{Path(p).name}", TrainDecoderConfig.from_json_path(p)) for p in paths]
    if not paths or paths == DEFAULT_PLAN_CONFIGS:
        base = TrainDecoderConfig.from_json_path(DEFAULT_PLAN_CONFIGS[1])
        raw = json.loads(base.to_json())
        raw["decoder"]["unets"] = [{**raw["decoder"]["unets"][0], **UNCLIP_SIZED_UNET}]
        raw["decoder"]["image_sizes"] = [64]
        configs.append(("3.5B base U-Net (64px)", TrainDecoderConfig.from_dict(raw)))
    print(f"Per process, {processes} processes, batch {batch_size} per process, precision {precision} (GiB):\n")
    print("| config | U-Net | parameters | mode | " + " | ".join(PARTS) + " | total |")
    print("|---|---|---|---|" + "---|" * (len(PARTS) + 1))
    for name, config in configs:
        config = attrs.evolve(config, data=attrs.evolve(config.data, batch_size=batch_size))
        for shape in unet_shapes(config):
            for label, sharded in (("DDP", False), ("FSDP", True)):
                memory = unet_memory(
                    shape, sharded=sharded, processes=processes, use_ema=config.train.use_ema, precision=precision
                )
                cells = " | ".join(f"{getattr(memory, part) / 2**30:.2f}" for part in PARTS)
                print(
                    f"| {name} | {shape.number} | {shape.parameters / 1e9:.3f}B | {label} | {cells} | "
                    f"{memory.total / 2**30:.2f} |"
                )


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def live_tensor_peak(trace: Path) -> int:
    """The most bytes of CPU tensors held at once above the profiled step's start: the running sum
    of the profiler's memory events (allocations positive, frees negative) in time order."""
    events = json.loads(trace.read_text())["traceEvents"]
    memory = [e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0]
    running = peak = 0
    for event in sorted(memory, key=lambda e: e["ts"]):
        running += event["args"]["Bytes"]
        peak = max(peak, running)
    return peak


def worker() -> int:
    """Inside each launched process: the training command with the two readings installed."""
    # What sharding imports (DTensor, FSDP, DCP) costs resident memory of its own, the same for any
    # model: imported before the baseline in both modes, so that the difference is the trained state.
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor  # noqa: F401

    from dalle2_decoder.config.decoder import DecoderConfig
    from dalle2_decoder.training.trainer import DecoderTrainer

    out = Path(os.environ["MEMORY_BENCH_OUT"])
    steps = int(os.environ["MEMORY_BENCH_STEPS"])
    profile = os.environ.get("MEMORY_BENCH_PROFILE") == "1"
    baseline = {}
    create = DecoderConfig.create

    def create_measured(self):
        baseline.setdefault("rss", status_kib("VmRSS") * 1024)
        return create(self)

    step = DecoderTrainer.train_step

    def train_step(self, batch):
        baseline.setdefault("setup", status_kib("VmRSS") * 1024)
        baseline.setdefault("setup_peak", status_kib("VmHWM") * 1024)
        rank = int(os.environ.get("RANK", "0"))
        profiler = None
        if profile and self.step == steps - 1:
            import torch.profiler

            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            profiler.__enter__()
        losses = step(self, batch)
        if profiler is not None:
            profiler.__exit__(None, None, None)
            profiler.export_chrome_trace(str(out / f"trace{rank}.json"))
            baseline["live_peak"] = live_tensor_peak(out / f"trace{rank}.json")
        if self.step >= steps:
            reading = {
                "rank": rank,
                "baseline": baseline["rss"],
                "setup": baseline["setup"],
                "setup_peak": baseline["setup_peak"],
                "peak": status_kib("VmHWM") * 1024,
                "live_peak": baseline.get("live_peak"),
            }
            (out / f"rank{rank}.json").write_text(json.dumps(reading))
            sys.stdout.flush()
            os._exit(0)  # every process at the same step: no collective is left waiting
        return losses

    DecoderConfig.create = create_measured
    DecoderTrainer.train_step = train_step
    from dalle2_decoder.cli import main

    return main()


def write_config(folder: Path, name: str, data: dict) -> Path:
    shape = CONFIGS[name]
    raw = {
        "seed": 1,
        "decoder": {
            "unets": [
                {
                    "dim": shape["dim"],
                    "image_embed_dim": EMBED_DIM,
                    "dim_mults": shape["dim_mults"],
                    "cond_dim": 64,
                    "num_resnet_blocks": 2,
                    "attn_heads": 4,
                    "attn_dim_head": 32,
                    "checkpoint_during_training": shape.get("checkpoint", False),
                }
            ],
            "image_sizes": [shape["image_size"]],
            "timesteps": 50,
            "learned_variance": False,
        },
        "data": {
            **data,
            "num_workers": 1,
            "batch_size": shape["batch_size"],
            "start_shard": 0,
            "end_shard": 3,
            "splits": {"train": 0.5, "val": 0.25, "test": 0.25},
        },
        "train": {"epochs": 1, "lr": 1e-4, "device": "cpu", "save_every_n_samples": 10**6},
        "tracker": {
            "data_path": str(folder / "run"),
            "log": {"log_type": "console"},
            "overwrite_data_path": True,
            "save": [{"save_to": "local", "save_latest_to": "latest.pth"}],
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(raw, indent=1))
    return path


MMAP_THRESHOLD = "131072"
"""glibc's default initial threshold (128 KiB), fixed: every tensor from 128 KiB up is mapped on its
own and unmapped when freed."""


def measure(
    config_path: Path,
    folder: Path,
    *,
    sharded: bool,
    processes: int,
    steps: int,
    malloc_default: bool = False,
    profile: bool = False,
) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    launch_config = ROOT / "accelerate_configs" / ("cpu_fsdp.yaml" if sharded else "cpu_multi_process.yaml")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config)]
    command += ["--num_processes", str(processes), "--main_process_port", "0", __file__, "--worker"]
    command += ["--config_file", str(config_path)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MEMORY_BENCH_OUT": str(folder),
        "MEMORY_BENCH_STEPS": str(steps),
        "PYTHONPATH": str(ROOT),
    }
    if not malloc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    if profile:
        env["MEMORY_BENCH_PROFILE"] = "1"
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder)
    readings = [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]
    if len(readings) != processes:
        raise SystemExit(f"{config_path} ({'FSDP' if sharded else 'DDP'}) failed:\n{result.stderr[-4000:]}")
    return readings


def planned(config_path: Path, *, sharded: bool, processes: int) -> int:
    from dalle2_decoder import TrainDecoderConfig
    from dalle2_decoder.training.memory_plan import unet_memory, unet_shapes

    config = TrainDecoderConfig.from_json_path(config_path)
    return sum(
        unet_memory(shape, sharded=sharded, processes=processes, use_ema=config.train.use_ema).total
        for shape in unet_shapes(config)
    )


def main() -> int:
    if "--worker" in sys.argv:
        sys.argv.remove("--worker")
        return worker()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    parser.add_argument("--malloc-default", action="store_true", help="glibc's dynamic mmap threshold (see above)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the last step's CPU allocations (torch.profiler) and print the live tensors' "
        "peak above its start; the profiler's own memory then inflates the resident readings",
    )
    parser.add_argument("--plan", nargs="*", type=Path, help="print the plan of these configs (see above)")
    parser.add_argument("--precision", default="bf16", help="with --plan")
    parser.add_argument("--batch-size", type=int, default=8, help="with --plan: per process")
    args = parser.parse_args()
    import warnings

    warnings.simplefilter("ignore")
    if args.plan is not None:
        processes = args.processes if "--processes" in sys.argv else 8
        configs = args.plan or DEFAULT_PLAN_CONFIGS
        plan_table(configs, processes=processes, precision=args.precision, batch_size=args.batch_size)
        return 0
    from dalle2_decoder.data.demo import generate_demo_dataset

    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        for name in args.configs:
            size = CONFIGS[name]["image_size"]
            data = generate_demo_dataset(
                str(root / f"demo{size}"), num_images=64, image_size=size, embed_dim=EMBED_DIM, shard_size=16
            )
            config_path = write_config(root / name, name, data)
            from dalle2_decoder import TrainDecoderConfig
            from dalle2_decoder.training.memory_plan import unet_shapes

            parameters = sum(s.parameters for s in unet_shapes(TrainDecoderConfig.from_json_path(config_path)))
            for label, sharded in (("DDP", False), ("FSDP", True)):
                readings = measure(
                    config_path,
                    root / name / label,
                    sharded=sharded,
                    processes=args.processes,
                    steps=args.steps,
                    malloc_default=args.malloc_default,
                    profile=args.profile,
                )
                measured = max(r["peak"] - r["baseline"] for r in readings)
                setup = max(r["setup"] - r["baseline"] for r in readings)
                setup_peak = max(r["setup_peak"] - r["baseline"] for r in readings)
                profiled = [r["live_peak"] for r in readings if r.get("live_peak") is not None]
                live = (
                    f"; live tensors at most {max(profiled) / 2**20:.1f} MiB above the last step's start"
                    if profiled
                    else ""
                )
                plan = planned(config_path, sharded=sharded, processes=args.processes)
                rows.append((name, parameters, label, plan, measured))
                print(
                    f"{name:7} {parameters / 1e6:6.1f}M {label:4} x{args.processes}: plan {plan / 2**20:8.1f} MiB, "
                    f"measured {measured / 2**20:8.1f} MiB ({(plan - measured) / measured:+.1%}); "
                    f"before the first step {setup / 2**20:.1f} MiB, peak so far {setup_peak / 2**20:.1f} MiB" + live,
                    flush=True,
                )
    malloc = "glibc's default" if args.malloc_default else f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"
    print(f"\nmalloc: {malloc}")
    print("\n| config | parameters | mode | plan (MiB/process) | measured peak - baseline (MiB) | plan vs measured |")
    print("|---|---|---|---|---|---|")
    ddp = {name: measured for name, _, label, _, measured in rows if label == "DDP"}
    for name, parameters, label, plan, measured in rows:
        ratio = f" (FSDP / DDP: {measured / ddp[name]:.2f})" if label == "FSDP" and name in ddp else ""
        print(
            f"| {name} | {parameters / 1e6:.1f}M | {label} x{args.processes} | {plan / 2**20:.1f} | "
            f"{measured / 2**20:.1f}{ratio} | {(plan - measured) / measured:+.1%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
