"""Largest difference between our modules and DALLE2-pytorch 1.15.6, per output kind, on the parity fixtures.

    python bench/reference_parity.py [--all]

Replays tests/fixtures/reference/ (written by scripts/reference_fixtures/generate.py) on our
modules, without the reference installed, and prints for each output kind the largest absolute
difference over all its cases and outputs, the case where it occurs, and the largest reference
output magnitude for scale (the parity tests require <= 1e-5). Kinds: "unet" (U-Net forward
outputs: conditioning kept, dropped, guided); "decoder: ..." (the Decoder's training loss per
U-Net, every DDPM / DDIM step, sampled and inpainted images; with a closed-form stand-in network,
and "(reference U-Nets)" end to end); other areas add their own kinds.
--all also prints every case/output.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict, Tuple

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5


def unet_kind() -> Dict[str, Tuple[float, float]]:
    from tests.reference_parity import load_unet_case, unet_case_names

    results = {}
    for name in unet_case_names():
        case = load_unet_case(name)
        unet = case.loaded()
        for output, expected in case.outputs.items():
            diff = (case.run(unet, output) - expected).abs().max().item()
            results[f"{name}/{output}"] = (diff, expected.abs().max().item())
    return results


def decoder_kinds() -> Dict[str, Dict[str, Tuple[float, float]]]:
    """The Decoder's output kinds (training loss, DDPM / DDIM steps, sampled / inpainted images;
    "(reference U-Nets)": end to end on our reference-architecture U-Nets) -> {case: (diff, scale)}."""
    from tests.decoder_parity import case_names, compare_case

    kinds: Dict[str, Dict[str, Tuple[float, float]]] = {}
    for name in case_names():
        scales: Dict[str, float] = {}
        for kind, diff in compare_case(name, scales).items():
            kinds.setdefault(f"decoder: {kind}", {})[name] = (diff, scales[kind])
    return kinds


_decoder_cache: Dict[str, Dict[str, Tuple[float, float]]] = {}


def decoder_kind(kind: str) -> Callable[[], Dict[str, Tuple[float, float]]]:
    def run() -> Dict[str, Tuple[float, float]]:
        if not _decoder_cache:
            _decoder_cache.update(decoder_kinds())
        return _decoder_cache.get(kind, {})

    return run


# kind -> function returning {case/output: (max |ours - reference|, max |reference|)}
KINDS: Dict[str, Callable[[], Dict[str, Tuple[float, float]]]] = {"unet": unet_kind}
for _kind in (
    "training loss",
    "DDPM step",
    "DDIM step",
    "sampled images",
    "inpainted images",
    "training loss (reference U-Nets)",
    "sampled images (reference U-Nets)",
    "inpainted images (reference U-Nets)",
):
    KINDS[f"decoder: {_kind}"] = decoder_kind(f"decoder: {_kind}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="print every case and output")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    ok = True
    print(f"{'kind':44s} {'outputs':>7s} {'max |diff|':>11s} {'max |ref|':>10s}  worst case")
    for kind, run in KINDS.items():
        results = run()
        if not results:
            continue
        worst = max(results, key=lambda k: results[k][0])
        diff = results[worst][0]
        scale = max(v[1] for v in results.values())
        ok &= diff <= TOLERANCE
        print(
            f"{kind:44s} {len(results):7d} {diff:11.2e} {scale:10.2f}  {worst}"
            f"{'' if diff <= TOLERANCE else '  ABOVE 1e-5'}"
        )
        if args.all:
            for key, (d, s) in sorted(results.items()):
                print(f"    {key:60s} {d:.2e} {s:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
