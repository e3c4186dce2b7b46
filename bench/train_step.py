"""Training-step throughput of our decoder, side by side with the reference implementation.

    python bench/train_step.py [--steps 10] [--repeats 2] [--device cpu|cuda] [--amp] [--channels-last]
                               [--compile] [--configs 64px 256px] [--threads N]
                               [--reference-python .venv-ref/bin/python] [--only ours|reference]

For each config (the CPU demo config, from example_configs/demo_cpu.json when it exists, else a
demo-like U-Net; and a 64px U-Net with dim 32, dim_mults [1, 2, 4], batch 16) it prints training
samples/s (forward + backward + AdamW step), peak memory, and achieved FLOP/s as a fraction of a
matmul peak measured in the same process. Every (implementation, config) runs in a fresh
subprocess, so peak memory is per run; the reference (DALLE2-pytorch) runs with its own
interpreter (`.venv-ref`), ours with this one. Runs alternate and the best of --repeats counts,
which matters on a shared machine. On CPU the workers use --threads threads (default 1) and the
figures include samples per CPU-second (process time), which other processes' load disturbs far
less than wall time does. Figures only: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "example_configs" / "demo_cpu.json"


def bench_configs() -> Dict[str, Dict[str, Any]]:
    """name -> {unet: kwargs, decoder: kwargs, batch: int}; option names are shared by both implementations."""
    configs: Dict[str, Dict[str, Any]] = {}
    if DEMO_CONFIG.exists():
        raw = json.loads(DEMO_CONFIG.read_text())["decoder"]
        unet = dict(raw["unets"][0])
        # Options of this package only (the sampler, the shifted schedule) change no training step's
        # cost and the reference's Decoder does not take them.
        ours_only = ("samplers", "noise_schedule_shift")
        decoder = {k: v for k, v in raw.items() if k not in ("unets", "clip", "image_size", *ours_only)}
        decoder["image_sizes"] = decoder["image_sizes"][:1]
        for per_unet in ("beta_schedule", "learned_variance", "sample_timesteps", "predict_x_start", "predict_v"):
            if isinstance(decoder.get(per_unet), list):
                decoder[per_unet] = decoder[per_unet][:1]
        batch = json.loads(DEMO_CONFIG.read_text()).get("data", {}).get("batch_size", 8)
        configs["CPU demo (example_configs/demo_cpu.json, U-Net 1)"] = dict(unet=unet, decoder=decoder, batch=batch)
    else:
        configs["demo-like: 32px, dim 16, mults [1,2,4], batch 8"] = dict(
            unet=dict(dim=16, image_embed_dim=64, cond_dim=32, dim_mults=[1, 2, 4], attn_heads=2, attn_dim_head=16),
            decoder=dict(image_sizes=[32], timesteps=1000),
            batch=8,
        )
    configs["64px, dim 32, mults [1,2,4], batch 16"] = dict(
        unet=dict(dim=32, image_embed_dim=512, cond_dim=64, dim_mults=[1, 2, 4], self_attn=[False, False, True]),
        decoder=dict(image_sizes=[64], timesteps=1000),
        batch=16,
    )
    # GPU-sized: a base U-Net at 64px and an upsampler-sized one at 256px (bench/gpu_check.sh).
    configs["64px GPU, dim 128, mults [1,2,3,4], batch 64"] = dict(
        unet=dict(
            dim=128,
            image_embed_dim=768,
            cond_dim=128,
            dim_mults=[1, 2, 3, 4],
            self_attn=[False, True, True, True],
            attn_dim_head=32,
            attn_heads=8,
        ),
        decoder=dict(image_sizes=[64], timesteps=1000),
        batch=64,
    )
    configs["256px GPU, dim 64, mults [1,2,4,8], batch 16"] = dict(
        unet=dict(
            dim=64,
            image_embed_dim=768,
            cond_dim=128,
            dim_mults=[1, 2, 4, 8],
            self_attn=[False, False, False, True],
            attn_dim_head=32,
            attn_heads=8,
        ),
        decoder=dict(image_sizes=[256], timesteps=1000),
        batch=16,
    )
    return configs


# ------------------------------------------------------------------------ worker (one subprocess)
def matmul_peak_flops(device: "torch.device", dtype: "torch.dtype") -> float:
    """FLOP/s of a large square matmul, best of several bursts: the practical peak of this process."""
    import torch

    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 50 if device.type == "cuda" else 5
    best = 0.0
    for _ in range(5):  # best of bursts: on a shared machine a single burst under-reads the peak
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def _sync(device: "torch.device") -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_worker(
    impl: str,
    config_name: str,
    steps: int,
    device_name: str,
    amp: bool,
    channels_last: bool,
    threads: Optional[int],
    compile_unet: bool = False,
) -> Dict[str, Any]:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from torch.utils.flop_counter import FlopCounterMode

    if impl == "ours":
        sys.path.insert(0, str(REPO))
        from dalle2_decoder.models import Decoder, Unet

        def build(cfg):
            return Decoder([Unet(**cfg["unet"])], **cfg["decoder"])
    else:
        from dalle2_pytorch import Decoder, Unet

        def build(cfg):
            return Decoder(unet=[Unet(**cfg["unet"])], **cfg["decoder"])

    cfg = bench_configs()[config_name]
    device = torch.device(device_name)
    torch.manual_seed(0)
    decoder = build(cfg).to(device)
    if channels_last:
        decoder = decoder.to(memory_format=torch.channels_last)
    decoder.train()
    optimizer = torch.optim.AdamW(decoder.unets[0].parameters(), lr=1e-4)
    size, batch = cfg["decoder"]["image_sizes"][0], cfg["batch"]
    images = torch.rand(batch, 3, size, size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    embeds = torch.randn(batch, cfg["unet"]["image_embed_dim"], device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def step() -> None:
        with autocast:
            loss = decoder(images, image_embed=embeds, unet_number=1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # lazy init, then the model FLOPs of one step, counted on the eager model
    flop_counter = FlopCounterMode(display=False)
    with flop_counter:
        step()
    flops_per_step = flop_counter.get_total_flops()
    if compile_unet:  # the U-Net's forward only: the decoder around it (noise, loss) stays eager
        unet = decoder.unets[0]
        unet.forward = torch.compile(unet.forward)
    for _ in range(3):  # warm-up: allocator, kernels (and compilation with --compile)
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    cpu_seconds = (time.process_time() - cpu_start) / steps
    if device.type == "cuda":
        peak_memory = torch.cuda.max_memory_allocated(device)
    else:
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS (Linux: KiB)
    peak = matmul_peak_flops(device, torch.bfloat16 if amp else torch.float32)
    return dict(
        params=sum(p.numel() for p in decoder.unets[0].parameters()),
        samples_per_s=batch / seconds,
        samples_per_cpu_s=batch / cpu_seconds,
        step_ms=seconds * 1000,
        peak_memory_mib=peak_memory / 2**20,
        flops_per_step=flops_per_step,
        achieved_flops=flops_per_step / seconds,
        matmul_peak_flops=peak,
        mfu=flops_per_step / seconds / peak,
    )


# ------------------------------------------------------------------------ driver
def run_in_subprocess(python: str, impl: str, name: str, args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    command = [
        python,
        __file__,
        "--worker",
        impl,
        "--config",
        name,
        "--steps",
        str(args.steps),
        "--device",
        args.device,
    ]
    command += ["--amp"] * args.amp + ["--channels-last"] * args.channels_last + ["--compile"] * args.compile
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"  {impl} failed on {name!r}:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net's forward")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=None,
        help="run only the configs whose names contain one of these words (e.g. '64px GPU')",
    )
    parser.add_argument("--json", default=None, help="also append each result as one JSON line to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (CPU default: 1)")
    parser.add_argument("--reference-python", default=str(REPO / ".venv-ref" / "bin" / "python"))
    parser.add_argument("--only", choices=["ours", "reference"], default=None)
    parser.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads is None and args.device == "cpu" and not args.worker:
        args.threads = 1
    if args.worker:
        result = run_worker(
            args.worker, args.config, args.steps, args.device, args.amp, args.channels_last, args.threads, args.compile
        )
        print(json.dumps(result))
        return 0

    impls = {"ours": sys.executable}
    if args.only != "ours":
        if Path(args.reference_python).exists():
            impls["reference"] = args.reference_python
        else:
            print(f"reference interpreter {args.reference_python} not found: our figures only")
    if args.only == "reference":
        impls.pop("ours")
    print(
        f"device {args.device}, amp(bf16) {args.amp}, channels_last {args.channels_last}, compile {args.compile}, "
        f"{args.steps} timed steps, best of {args.repeats}, threads {args.threads or 'default'}"
    )
    names = [n for n in bench_configs() if not args.configs or any(word in n for word in args.configs)]
    for name in names:
        best: Dict[str, Dict[str, Any]] = {}
        for _ in range(args.repeats):
            for impl, python in impls.items():  # alternate, so drifting machine load hits both alike
                result = run_in_subprocess(python, impl, name, args)
                key = "samples_per_cpu_s" if args.device == "cpu" else "samples_per_s"
                if result and (impl not in best or result[key] > best[impl][key]):
                    best[impl] = result
        print(f"\n{name}")
        for impl, r in best.items():
            print(
                f"  {impl:9s} params {r['params']:>11,d}  {r['samples_per_s']:8.2f} samples/s  "
                f"{r['samples_per_cpu_s']:8.2f} samples/CPU-s  {r['step_ms']:8.1f} ms/step  "
                f"peak mem {r['peak_memory_mib']:8.1f} MiB  {r['flops_per_step'] / 1e9:8.2f} GFLOP/step  "
                f"{r['achieved_flops'] / 1e9:8.2f} GFLOP/s = {100 * r['mfu']:5.1f}% of matmul peak "
                f"({r['matmul_peak_flops'] / 1e9:.1f} GFLOP/s)"
            )
        if args.json:
            with open(args.json, "a") as handle:
                for impl, r in best.items():
                    handle.write(
                        json.dumps(
                            {
                                "config": name,
                                "impl": impl,
                                "device": args.device,
                                "bf16": args.amp,
                                "channels_last": args.channels_last,
                                "compile": args.compile,
                                **r,
                            }
                        )
                        + "\n"
                    )
        if "ours" in best and "reference" in best:
            o, r = best["ours"], best["reference"]
            print(
                f"  ours / reference: samples/s x{o['samples_per_s'] / r['samples_per_s']:.2f}, "
                f"samples/CPU-s x{o['samples_per_cpu_s'] / r['samples_per_cpu_s']:.2f}, "
                f"peak memory x{o['peak_memory_mib'] / r['peak_memory_mib']:.2f}, "
                f"params x{o['params'] / r['params']:.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
