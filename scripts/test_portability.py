"""Run the numerical tests on every CPU kernel path and thread count, and print one line per variant.

The suite's numerical comparisons use tolerances derived from float32 rounding (tests/numerics.py);
a tolerance that holds only for the kernels and thread count of the machine it was written on
fails here, on any machine, instead of on a user's.

    python scripts/test_portability.py                            # 6 variants x the numerical tests
    python scripts/test_portability.py --variants default:1 --files parity   # part of what CI runs
    python scripts/test_portability.py --list                     # the variants and the test files

Variants are kernels x threads:
- kernels `default`: ATEN_CPU_CAPABILITY=default, ONEDNN_MAX_CPU_ISA=SSE41 and
  MKL_ENABLE_INSTRUCTIONS=SSE4_2, the baseline kernels of PyTorch, oneDNN and MKL (an old CPU);
  `avx2`: the same three capped at AVX2; `native`: none set, what this machine picks (on a machine
  without AVX2, `avx2` gives what it has, which the summary shows).
- threads 1 or 2: DALLE2_TEST_THREADS (the tests' `compute_threads` fixture) and OMP_NUM_THREADS
  (torch's default in the test process and in the processes the tests start).
Exit status 1 when any variant has a failure or an error.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]

KERNELS: Dict[str, Dict[str, str]] = {
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "native": {},
}
THREADS = (1, 2)

FILES: Dict[str, List[str]] = {
    # Ours against DALLE2-pytorch's recorded outputs.
    "parity": [
        "tests/test_reference_parity_unet.py",
        "tests/test_reference_parity_decoder.py",
    ],
    # Every other test that compares computed numbers: the samplers against diffusers, identities
    # of the model, checkpoint and resume round trips, EMA, metrics (1 and 2 processes).
    "numerical": [
        "tests/test_reference_checkpoints.py",
        "tests/test_samplers.py",
        "tests/test_models_unet.py",
        "tests/test_models_decoder.py",
        "tests/test_models_diffusion.py",
        "tests/test_reliability_models.py",
        "tests/test_options_table.py",
        "tests/test_training_trainer.py",
        "tests/test_tracking_decoder.py",
        "tests/test_load_decoder.py",
        "tests/test_evaluation_metrics.py",
        "tests/test_evaluation_distributed.py",
        "tests/test_training_loop.py::test_stopped_mid_epoch_then_auto_resumed_ends_with_the_same_weights",
    ],
}
FILES["all"] = FILES["parity"] + FILES["numerical"]


def variant_env(kernels: str, threads: int) -> Dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in KERNELS["default"]}
    env.update(KERNELS[kernels])
    env.update(DALLE2_TEST_THREADS=str(threads), OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    return env


def kernels_in_use(env: Dict[str, str]) -> str:
    """The CPU capability torch reports under `env` (what ATEN_CPU_CAPABILITY really gave)."""
    command = [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    return result.stdout.strip() or "?"


def counts(junit: Path) -> Tuple[int, int, int, int]:
    """(passed, failed, errors, skipped) from pytest's JUnit XML report."""
    if not junit.is_file():
        return 0, 0, 1, 0
    suites = ElementTree.parse(junit).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    total = failed = errors = skipped = 0
    for suite in suites:
        total += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0))
        errors += int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
    return total - failed - errors - skipped, failed, errors, skipped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variants",
        default="default:1,default:2,avx2:1,avx2:2,native:1,native:2",
        help="comma-separated KERNELS:THREADS (kernels: default, avx2, native)",
    )
    parser.add_argument("--files", default="all", choices=sorted(FILES), help="which test files (default: all)")
    parser.add_argument("--timeout", type=int, default=900, help="per-test limit in seconds (pytest-timeout)")
    parser.add_argument("--list", action="store_true", help="print the variants and the test files, then exit")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args()
    variants = []
    for item in args.variants.split(","):
        kernels, _, threads = item.strip().partition(":")
        if kernels not in KERNELS or not threads.isdigit() or int(threads) < 1:
            parser.error(f"--variants: {item!r} is not KERNELS:THREADS with KERNELS one of {sorted(KERNELS)}")
        variants.append((kernels, int(threads)))
    files = FILES[args.files]
    if args.list:
        print("variants:", ", ".join(f"{k}:{t}" for k, t in variants))
        print("\n".join(files))
        return 0

    rows = []
    with TemporaryDirectory() as folder:
        for kernels, threads in variants:
            env = variant_env(kernels, threads)
            name = f"{kernels}, {threads} thread{'s' if threads > 1 else ''}"
            print(f"\n===== {name}: {' '.join(f'{k}={v}' for k, v in KERNELS[kernels].items()) or '(this machine)'}")
            sys.stdout.flush()
            junit = Path(folder) / f"{kernels}-{threads}.xml"
            command = [
                sys.executable,
                "-m",
                "pytest",
                *files,
                "-q",
                "-p",
                "no:cacheprovider",
                "-m",
                "not cuda",
                f"--timeout={args.timeout}",
                f"--junitxml={junit}",
                *args.pytest_args,
            ]
            start = time.monotonic()
            process = subprocess.Popen(
                command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            closest = ""
            assert process.stdout is not None
            for line in process.stdout:
                sys.stdout.write(line)
                if line.startswith("numerics: "):
                    closest = re.sub(r"^numerics: .*?\); ", "", line.strip())
            process.wait()
            minutes = (time.monotonic() - start) / 60
            rows.append((name, kernels_in_use(env), *counts(junit), minutes, closest))
            sys.stdout.flush()

    print(f"\n===== portability summary (scripts/test_portability.py: {args.files} test files)")
    header = ("variant", "torch kernels", "passed", "failed", "errors", "skipped", "min")
    print("{:20s} {:13s} {:>6s} {:>6s} {:>6s} {:>7s} {:>5s}".format(*header))
    for name, capability, passed, failed, errors, skipped, minutes, closest in rows:
        print(f"{name:20s} {capability:13s} {passed:6d} {failed:6d} {errors:6d} {skipped:7d} {minutes:5.1f}  {closest}")
    bad = [row[0] for row in rows if row[3] or row[4] or not row[2]]
    print("all variants passed" if not bad else f"FAILED: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
