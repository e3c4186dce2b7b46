"""Write the reference-parity fixtures with DALLE2-pytorch 1.15.6 itself.

Run with the interpreter of a virtual environment that has `dalle2-pytorch==1.15.6` installed (it
needs `setuptools<70` installed after torch to import), from the repository root:

    /path/to/refvenv/bin/python scripts/reference_fixtures/generate.py [--only unet,decoder,checkpoints]

Each area has its own module (`unet_cases.py`, `decoder_cases.py`, `checkpoint_cases.py`) with a
`generate(out_dir)` function that writes only under `tests/fixtures/reference/<area>/`. Areas whose
module is not present are skipped. Everything is deterministic (fixed seeds, CPU, fp32), so running
the script again rewrites the same fixtures.
"""
from __future__ import annotations

import argparse
import importlib
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE.parent.parent / "tests" / "fixtures" / "reference"
AREAS = {"unet": "unet_cases", "decoder": "decoder_cases", "checkpoints": "checkpoint_cases"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(AREAS), help="comma-separated areas: " + ", ".join(AREAS))
    args = parser.parse_args(argv)
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in AREAS]
    if unknown:
        parser.error(f"unknown area(s) {', '.join(unknown)}; choose from {', '.join(AREAS)}")

    import torch

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    for area in wanted:
        module_name = AREAS[area]
        if not (HERE / f"{module_name}.py").is_file():
            print(f"{area}: {module_name}.py not present, skipped")
            continue
        module = importlib.import_module(module_name)
        out_dir = OUT / area
        out_dir.mkdir(parents=True, exist_ok=True)
        module.generate(out_dir)
        size = sum(path.stat().st_size for path in out_dir.rglob("*") if path.is_file())
        print(f"{area}: wrote {out_dir} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
