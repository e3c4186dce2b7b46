"""`python -m dalle2_decoder.posthoc_ema --run FOLDER --sigma_rel 0.08 --out model.safetensors`
(also `dalle2-posthoc-ema`): the EMA of any length, made after training from a run's post-hoc EMA
snapshots (`train.posthoc_ema_sigma_rels`; the method is in `training/posthoc_ema.py`), written as
a model save that `load_decoder`, the sampling and the evaluation commands read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .failures import EXIT_OK
from .training.posthoc_ema import (
    SNAPSHOT_FOLDER,
    Profile,
    Snapshot,
    SnapshotError,
    combine_snapshots,
    fit_profiles,
    gamma_from_sigma_rel,
    list_snapshots,
    sigma_rel_of_gamma,
)


def snapshot_folder(run: Path) -> Path:
    """A run's `posthoc_ema/` folder, given the run folder (`tracker.data_path`) or that folder itself."""
    run = Path(run)
    return run / SNAPSHOT_FOLDER if (run / SNAPSHOT_FOLDER).is_dir() else run


def choose_snapshots(
    snapshots: Sequence[Snapshot], *, updates: Optional[int] = None, sigma_rels: Optional[Sequence[float]] = None
) -> List[Snapshot]:
    """The snapshots a reconstruction at `updates` may use: none taken later; only the profiles in
    `sigma_rels` when given."""
    chosen = [s for s in snapshots if updates is None or s.updates <= updates]
    if sigma_rels is not None:
        wanted = {float(s) for s in sigma_rels}
        chosen = [s for s in chosen if s.sigma_rel in wanted]
    return chosen


def reconstruct(
    run: Path,
    sigma_rel: float,
    *,
    updates: Optional[int] = None,
    from_sigma_rels: Optional[Sequence[float]] = None,
):
    """(weights of the trained U-Nets by decoder name, the fit, the snapshots used, the target's updates)."""
    folder = snapshot_folder(run)
    available = list_snapshots(folder)
    if not available:
        raise SnapshotError(f"{folder}: no post-hoc EMA snapshots (train.posthoc_ema_sigma_rels was not set?)")
    target_updates = updates if updates is not None else max(s.updates for s in available)
    chosen = choose_snapshots(available, updates=target_updates, sigma_rels=from_sigma_rels)
    if not chosen:
        raise SnapshotError(f"{folder}: no snapshot taken at or before update {target_updates} with those profiles")
    unets = {s.unets for s in chosen}
    if len(unets) != 1:
        raise SnapshotError(f"{folder}: the snapshots hold different U-Nets ({sorted(unets)}); keep one run's only")
    target = Profile(gamma=gamma_from_sigma_rel(sigma_rel), start=0, count=target_updates)
    fit = fit_profiles([s.profile for s in chosen], target)
    return combine_snapshots(chosen, fit.coefficients), fit, chosen, target_updates


def _base_weights(run: Path, base: Optional[str]) -> Optional[Dict[str, torch.Tensor]]:
    """Weights for the U-Nets the snapshots do not hold: `base`, else the run's latest checkpoint."""
    from .loading import load
    from .tracking.run_state import read_run_state

    if base is None:
        state = read_run_state(Path(run)) if (Path(run) / "run_state.json").is_file() else None
        base = state.latest_checkpoint if state is not None else None
    if base is None:
        return None
    return load(base).decoder.state_dict()


def write_model(
    run: Path,
    sigma_rel: float,
    out: Path,
    *,
    updates: Optional[int] = None,
    from_sigma_rels: Optional[Sequence[float]] = None,
    base: Optional[str] = None,
) -> str:
    """Reconstruct and write a model save at `out`; returns the command's one-line report."""
    from .config.decoder import DecoderConfig
    from .config.structure import structure_at
    from .tracking.checkpoint import load_state_dict_checked, save_model

    weights, fit, chosen, target_updates = reconstruct(run, sigma_rel, updates=updates, from_sigma_rels=from_sigma_rels)
    config_json = chosen[-1].config_json
    if not config_json:
        raise SnapshotError(f"{chosen[-1].path}: records no run configuration, so no decoder can be built")
    raw = json.loads(config_json)
    decoder_config, problems = structure_at(raw.get("decoder"), DecoderConfig, "decoder")
    if decoder_config is None or problems:
        raise SnapshotError(f"{chosen[-1].path}: its decoder configuration does not load: {'; '.join(problems)}")
    decoder = decoder_config.create()
    state = decoder.state_dict()
    covered = chosen[-1].unets
    uncovered = [n for n in range(1, len(decoder.unets) + 1) if n not in covered]
    if uncovered:
        base_state = _base_weights(run, base)
        if base_state is None:
            raise SnapshotError(
                f"U-Net(s) {', '.join(map(str, uncovered))} were not trained in this run, so the snapshots lack "
                "them and the run records no checkpoint; give --base with a checkpoint or model save holding them"
            )
        state.update(base_state)
    state.update(weights)
    load_state_dict_checked(decoder, state, source=f"post-hoc EMA of {snapshot_folder(run)}")
    save_model(out, decoder.state_dict(), step=target_updates, config_json=config_json)
    profiles = ", ".join(sorted({repr(s.sigma_rel) for s in chosen}))
    return (
        f"wrote {out}: EMA sigma_rel={sigma_rel} at update {target_updates}, from {len(chosen)} snapshots "
        f"(profiles {profiles}); fit residual L1 {fit.residual_l1:.3g} (0 is exact, 2 is unrelated)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dalle2-posthoc-ema",
        description="Make the EMA of any length from a run's post-hoc EMA snapshots (train.posthoc_ema_sigma_rels) "
        "and write it as a model save (Karras et al. 2024, EDM2, section 3).",
    )
    parser.add_argument("--run", required=True, metavar="FOLDER", help="the run folder (tracker.data_path)")
    parser.add_argument(
        "--sigma_rel", required=True, type=float, help="the EMA length wanted, as relative standard deviation"
    )
    parser.add_argument("--out", required=True, metavar="PATH", help="the model save to write (.safetensors or .pt)")
    parser.add_argument(
        "--updates", type=int, default=None, help="EMA updates (optimizer steps) to reconstruct at; default: the last"
    )
    parser.add_argument(
        "--from_sigma_rels",
        type=float,
        nargs="+",
        default=None,
        metavar="SIGMA_REL",
        help="use the snapshots of these profiles only (default: all)",
    )
    parser.add_argument(
        "--base",
        default=None,
        metavar="PATH",
        help="checkpoint or model save for the U-Nets the run did not train (default: the run's latest checkpoint)",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .failures import guarded

    parser = build_parser()
    args = parser.parse_args(argv)
    limit = sigma_rel_of_gamma(0.0)
    if not 0 < args.sigma_rel < limit:
        parser.error(f"--sigma_rel must be in (0, {limit:.4f}): longer averages have no power-function profile")

    def body() -> int:
        print(
            write_model(
                Path(args.run),
                args.sigma_rel,
                Path(args.out),
                updates=args.updates,
                from_sigma_rels=args.from_sigma_rels,
                base=args.base,
            ),
            flush=True,
        )
        return EXIT_OK

    return guarded(body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
