"""Write the reference-parity fixtures under tests/fixtures/reference/ (issue 12).

Run with the interpreter that has DALLE2-pytorch 1.15.6 installed (not this package):

    /work/refvenv/bin/python scripts/reference_fixtures/generate.py [--only unet,decoder,checkpoints]

Each area is one module here with `generate(out_dir)`, writing only under its own subfolder:
unet_cases.py -> unet/, decoder_cases.py -> decoder/, checkpoint_cases.py -> checkpoints/.
Modules not present yet are skipped with a note. Deterministic: fixed seeds, CPU, fp32.
"""
from __future__ import annotations

import argparse
import importlib
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
OUT_DIR = HERE.parent.parent / "tests" / "fixtures" / "reference"
AREAS = {"unet": "unet_cases", "decoder": "decoder_cases", "checkpoints": "checkpoint_cases"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(AREAS), help="comma-separated areas: " + ", ".join(AREAS))
    parser.add_argument("--out", type=pathlib.Path, default=OUT_DIR, help="fixture root (default: tests/fixtures/reference)")
    args = parser.parse_args(argv)
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in AREAS]
    if unknown:
        parser.error(f"unknown area(s) {', '.join(unknown)}; choose from {', '.join(AREAS)}")

    import torch

    torch.set_num_threads(1)  # deterministic CPU reductions
    torch.use_deterministic_algorithms(True)
    sys.path.insert(0, str(HERE))
    for name in wanted:
        if not (HERE / f"{AREAS[name]}.py").exists():
            print(f"{name}: {AREAS[name]}.py not present on this branch, skipped")
            continue
        module = importlib.import_module(AREAS[name])
        module.generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
