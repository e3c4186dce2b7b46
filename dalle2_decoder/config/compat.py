"""Reading configs written for the reference trainer (DALLE2-pytorch's train_decoder.py) unchanged.

Most of its options have the same name and meaning here and need nothing. This pass handles the
few that the reference accepted but that mean nothing (or something spelled differently) here,
on the raw JSON before structuring, and returns a note for each option it drops, and a problem for
one it cannot drop without changing what the run does. Configs of early releases (LAION's
released decoders were trained with 0.15.4) also carry options those releases read and later ones
ignore: `tracker.log.wandb_resume` (before 0.23) and the saver flags written under `train`.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Tuple

IGNORED_SAVER_OPTIONS = ("save_all", "save_latest", "save_best")
"""Flags of the reference's saver config that its savers never read; `save_*_to` decide what is saved."""


def adapt_reference_options(raw: Dict[str, Any]) -> Tuple[Dict[str, Any], List[str], List[str]]:
    """A copy of `raw` with the reference-only options resolved, a note for each one dropped, and problems."""
    raw = copy.deepcopy(raw)
    notes: List[str] = []
    problems: List[str] = []
    train = raw.get("train")
    if isinstance(train, dict):
        for name in IGNORED_SAVER_OPTIONS:
            if name in train:
                del train[name]
                notes.append(
                    f"train.{name}: a flag of the reference's saver config, which DALLE2-pytorch ignores under "
                    "train; ignored here too"
                )
    tracker = raw.get("tracker")
    if isinstance(tracker, dict):
        log = tracker.get("log")
        if isinstance(log, dict) and "wandb_resume" in log:
            if log["wandb_resume"] is False:
                del log["wandb_resume"]
                notes.append(
                    "tracker.log.wandb_resume: false: an option of DALLE2-pytorch before 0.23 (later releases "
                    "ignore it; resume took its place); ignored"
                )
            elif log["wandb_resume"] is True:
                del log["wandb_resume"]
                problems.append(
                    "tracker.log.wandb_resume: true resumed the wandb run in DALLE2-pytorch before 0.23, which "
                    "later releases ignore: write resume: true (with wandb_run_id) to resume it, or remove it"
                )
        savers = tracker.get("save")
        listed = savers if isinstance(savers, list) else [savers]
        for index, saver in enumerate(listed):
            if not isinstance(saver, dict):
                continue
            path = f"tracker.save[{index}]" if isinstance(savers, list) else "tracker.save"
            for name in IGNORED_SAVER_OPTIONS:
                if name in saver:
                    del saver[name]
                    notes.append(
                        f"{path}.{name}: option of the reference trainer that has no effect, ignored; "
                        "save_latest_to, save_best_to and save_meta_to decide what is saved"
                    )
            for name in ("save_latest_to", "save_best_to"):
                if saver.get(name) is False:  # the reference's way of switching one off
                    saver[name] = None
        load = tracker.get("load")
        if isinstance(load, dict) and "load_from" in load and load["load_from"] is None:
            others = sorted(key for key in load if key != "load_from")
            if others:
                notes.append(
                    f"tracker.load: load_from is null, so no checkpoint is loaded and {', '.join(others)} "
                    f"{'is' if len(others) == 1 else 'are'} ignored"
                )
            tracker["load"] = None
    decoder = raw.get("decoder")
    if isinstance(decoder, dict) and isinstance(decoder.get("clip"), dict):
        if "base_model_kwargs" in decoder["clip"] and decoder["clip"]["base_model_kwargs"] is None:
            del decoder["clip"]["base_model_kwargs"]  # only meaningful for the reference's x-clip / coca adapters
    return raw, notes, problems
