"""Write the reference-parity fixtures of tests/fixtures/reference/ with DALLE2-pytorch 1.15.6.

    /work/refvenv/bin/python scripts/reference_fixtures/generate.py [--only unet,decoder,checkpoints] [--out DIR]
    PYTHON scripts/reference_fixtures/generate.py --only releases [--cascade-base DIR]


Run with an interpreter that has dalle2-pytorch==1.15.6 (and setuptools<70, installed after
torch, for it to import); this script imports nothing from this project. One module per area
(`unet_cases`, `decoder_cases`, `checkpoint_cases`), each with `generate(out_dir)` writing only
under its own subfolder; modules not present yet are skipped with a note. Deterministic (fixed
seeds, CPU, fp32): re-running rewrites identical files.

The `releases` area runs under whichever DALLE2-pytorch release the interpreter has (any release,
not only 1.15.6) and writes `releases/<version>/`; `releases.py` beside this script installs the
releases one at a time in throwaway environments and runs it for each. The `laion` area runs the
same way (`laion_cases`: LAION's published decoder shrunk, under the release that trained it).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
AREAS = {
    "unet": "unet_cases",
    "decoder": "decoder_cases",
    "checkpoints": "checkpoint_cases",
    "releases": "release_cases",
    "laion": "laion_cases",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_areas = ",".join(area for area in AREAS if area not in ("releases", "laion"))
    parser.add_argument("--only", default=default_areas, help="comma-separated areas: " + ", ".join(AREAS))
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "reference")
    parser.add_argument(
        "--cascade-base",
        type=Path,
        default=None,
        help="releases: a releases/<version>/ folder whose base samples this release's upsampler continues",
    )
    args = parser.parse_args()
    areas = [a.strip() for a in args.only.split(",") if a.strip()]
    unknown = [a for a in areas if a not in AREAS]
    if unknown:
        parser.error(f"unknown areas {unknown}; choose from {sorted(AREAS)}")

    import torch

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    for area in areas:
        try:
            module = importlib.import_module(AREAS[area])
        except ModuleNotFoundError as err:
            if err.name != AREAS[area]:
                raise
            print(f"{area}: {AREAS[area]}.py not present, skipped")
            continue
        out_dir = args.out / area
        out_dir.mkdir(parents=True, exist_ok=True)
        if area == "releases":
            out_dir = module.generate(out_dir, cascade_base=args.cascade_base)
        else:
            module.generate(out_dir)
        size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
        print(f"{area}: wrote {out_dir} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
