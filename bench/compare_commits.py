"""Train-step and sampling speed of two commits of this package, side by side in the same run.

    python bench/compare_commits.py BEFORE [AFTER] [--repeats 3] [--steps 10] [--keep]

For a refactor that must not change speed: each commit is checked out into a temporary git worktree
and measured in fresh subprocesses that import that worktree's package, alternating BEFORE, AFTER,
BEFORE, ... so drifting machine load hits both alike. AFTER defaults to the working tree. Figures:

- train step: `bench/train_step.py --only ours` of each commit on the CPU demo config (samples per
  CPU-second, which other processes' load disturbs far less than wall time);
- sampling: `Decoder.sample` of a small two-U-Net cascade with random weights (16 -> 32 px, 100
  timesteps) through the full DDPM chain, DDIM with 20 steps and DPM-Solver++(2M) with 10, as CPU
  seconds per image, one thread.

The best of --repeats counts; the ratio AFTER/BEFORE is printed. Figures only: nothing asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]

# Runs inside the measured tree: only public names that both sides of a refactor keep.
SAMPLING_SNIPPET = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from dalle2_decoder.config import DecoderConfig, UnetConfig
torch.manual_seed(0)
unets = [UnetConfig(dim=32, image_embed_dim=32, dim_mults=(1, 2)) for _ in range(2)]
config = DecoderConfig(unets=unets, image_sizes=[16, 32], timesteps=100)
decoder = config.create().eval()
embed = torch.randn(2, 32)
out = {}
for name, sampler, steps in (("ddpm_100", "ddpm", 100), ("ddim_20", "ddim", 20), ("dpmpp_2m_10", "dpmpp_2m", 10)):
    torch.manual_seed(0)
    start = time.process_time()
    with torch.no_grad():
        decoder.sample(image_embed=embed, sampler=sampler, sample_timesteps=steps)
    out[name] = (time.process_time() - start) / embed.shape[0]
print(json.dumps(out))
"""


def worktree(commit: str, root: Path) -> Path:
    path = root / commit.replace("/", "_")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(path), commit], check=True)
    return path


def run_in(tree: Path, args: List[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: {' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def train_step(tree: Path, steps: int) -> float:
    out = Path(tempfile.mkstemp(suffix=".jsonl")[1])
    try:
        run_in(
            tree,
            ["bench/train_step.py", "--only", "ours", "--steps", str(steps), "--repeats", "1", "--configs", "demo"]
            + ["--json", str(out)],
        )
        rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    finally:
        out.unlink()
    return max(row["samples_per_cpu_s"] for row in rows)


def sampling(tree: Path) -> Dict[str, float]:
    return json.loads(run_in(tree, ["-c", SAMPLING_SNIPPET]).strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after", nargs="?", default=None, help="a commit; default: the working tree")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="compare-commits-") as scratch:
        root = Path(scratch)
        trees = {"before": worktree(args.before, root), "after": worktree(args.after, root) if args.after else REPO}
        try:
            best_train: Dict[str, float] = {}
            best_sample: Dict[str, Dict[str, float]] = {}
            for _ in range(args.repeats):
                for side, tree in trees.items():  # alternate, so drifting load hits both alike
                    best_train[side] = max(best_train.get(side, 0.0), train_step(tree, args.steps))
                    for name, seconds in sampling(tree).items():
                        best_sample.setdefault(side, {})
                        best_sample[side][name] = min(best_sample[side].get(name, float("inf")), seconds)
        finally:
            for tree in trees.values():
                if tree != REPO:
                    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    label = args.after or "working tree"
    print(f"before {args.before}, after {label}; best of {args.repeats}, one thread")
    print(
        f"train step (CPU demo config), samples per CPU-second: before {best_train['before']:.2f}, "
        f"after {best_train['after']:.2f}, after/before {best_train['after'] / best_train['before']:.3f}"
    )
    for name in best_sample["before"]:
        b, a = best_sample["before"][name], best_sample["after"][name]
        print(f"sampling {name:12s} CPU-s per image: before {b:.3f}, after {a:.3f}, after/before {a / b:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
