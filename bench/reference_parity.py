"""Largest difference between our modules and DALLE2-pytorch 1.15.6, per output kind, on the parity fixtures.

    python bench/reference_parity.py [--all]

Replays tests/fixtures/reference/ (written by scripts/reference_fixtures/generate.py) on our
modules, without the reference installed, and prints for each output kind the largest difference
over all its cases and outputs in ulps of scale (float32 eps times the largest reference magnitude
of that output, tests/numerics.py), the bound the parity tests allow it, the largest absolute
difference and the case where the kind comes closest to its bound. Kinds: "unet" (U-Net forward
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
Result = Tuple[float, float, float]
"""(max |ours - reference|, max |reference|, the bound in ulps of scale)"""


def unet_kind() -> Dict[str, Result]:
    from tests.reference_parity import allowed_ulps, load_unet_case, unet_case_names

    results = {}
    for name in unet_case_names():
        case = load_unet_case(name)
        unet = case.loaded()
        for output, expected in case.outputs.items():
            diff = (case.run(unet, output) - expected).abs().max().item()
            results[f"{name}/{output}"] = (diff, expected.abs().max().item(), allowed_ulps(name))
    return results


def decoder_kinds() -> Dict[str, Dict[str, Result]]:
    """The Decoder's output kinds (training loss, DDPM / DDIM steps, sampled / inpainted images;
    "(reference U-Nets)": end to end on our reference-architecture U-Nets) -> {case: (diff, scale, bound)}."""
    from tests.decoder_parity import allowed_ulps, case_names, compare_case

    kinds: Dict[str, Dict[str, Result]] = {}
    for name in case_names():
        scales: Dict[str, float] = {}
        for kind, diff in compare_case(name, scales).items():
            kinds.setdefault(f"decoder: {kind}", {})[name] = (diff, scales[kind], allowed_ulps(kind))
    return kinds


_decoder_cache: Dict[str, Dict[str, Result]] = {}


def decoder_kind(kind: str) -> Callable[[], Dict[str, Result]]:
    def run() -> Dict[str, Result]:
        if not _decoder_cache:
            _decoder_cache.update(decoder_kinds())
        return _decoder_cache.get(kind, {})

    return run


# kind -> function returning {case/output: (max |ours - reference|, max |reference|, bound in ulps of scale)}
KINDS: Dict[str, Callable[[], Dict[str, Result]]] = {"unet": unet_kind}
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

    from tests.numerics import EPS32

    torch.set_num_threads(1)
    ok = True
    print(f"{'kind':44s} {'outputs':>7s} {'ulps':>7s} {'bound':>6s} {'max |diff|':>11s}  closest to its bound")
    for kind, run in KINDS.items():
        results = run()
        if not results:
            continue
        ulps = {key: diff / (EPS32 * scale) for key, (diff, scale, _) in results.items()}
        worst = max(results, key=lambda key: ulps[key] / results[key][2])
        bound = results[worst][2]
        ok &= ulps[worst] <= bound
        print(
            f"{kind:44s} {len(results):7d} {ulps[worst]:7.1f} {bound:6g} {max(v[0] for v in results.values()):11.2e}"
            f"  {worst}{'' if ulps[worst] <= bound else '  ABOVE ITS BOUND'}"
        )
        if args.all:
            for key, (diff, scale, bound) in sorted(results.items()):
                print(f"    {key:60s} {diff:.2e} {scale:.2f} {ulps[key]:7.1f} / {bound:g} ulps of scale")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
