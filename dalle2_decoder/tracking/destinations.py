"""Where a run's saves land on this machine, and what no clean-up may remove.

Paths come from `config.tracker.local_save_destinations`, the one place that resolves a local
saver's options; this module adds the run's own resume point, the `{epoch}`-style fields of save
paths, and the files `overwrite_data_path` must keep (the start checkpoint, the data the run reads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ..config.tracker import LocalLoadConfig, TrackerConfig, local_save_destinations

RESUME_CHECKPOINT = Path("resume") / "latest_checkpoint.pt"
"""The run's resume point under `data_path` when no local saver keeps a checkpoint."""
RESUME_SHARDED = Path("resume") / "latest_checkpoint"
"""A sharded run's kept checkpoint: a link to its folder (see `tracking.sharded`)."""


def save_path_fields(step: int, fields: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Values for the `{epoch}`-style fields of save paths; what the caller does not give has a neutral value."""
    values: Dict[str, Any] = {
        "epoch": 0,
        "sample": 0,
        "next_task": "train",
        "validation_losses": [],
        "samples_seen": step,
    }
    values.update(fields or {})
    return values


def local_destinations(config: TrackerConfig, data_path: Path) -> List[Path]:
    """The files (and links to sharded checkpoint folders) local savers write (relative paths are under `data_path`)."""
    saves = local_save_destinations(config, data_path, ("save_latest_to", "save_best_to"))
    return [dest.path for dest in saves] + [data_path / RESUME_CHECKPOINT, data_path / RESUME_SHARDED]


def saves_wanted(config: TrackerConfig, save_type: str, is_best: bool) -> bool:
    """Whether a save (`is_best` or not) writes a `save_type` ("checkpoint" or "model") somewhere: every
    process of a sharded run decides alike, before gathering or writing anything."""
    for save in config.save:
        if save.save_type == save_type and (save.save_latest_to or (is_best and save.save_best_to)):
            return True
    return save_type == "checkpoint" and config.log.auto_resume


def protected_paths(config: TrackerConfig, full_config_dict: Mapping[str, Any], data_path: Path) -> List[Path]:
    """Files `overwrite_data_path` must never remove: the `tracker.load` file, local saver
    destinations, and what the data section reads (relative paths as the process sees them)."""
    paths: List[Path] = []
    if isinstance(config.load, LocalLoadConfig):
        paths.append(Path(config.load.file_path))
    paths += [dest.path for dest in local_save_destinations(config, data_path)]
    data = full_config_dict.get("data") if isinstance(full_config_dict, Mapping) else None
    paths.extend(_local_data_paths(data or {}))
    return paths


def _pattern_folder(text: str) -> Path:
    """The folder a shard pattern reads from (`shards/{}.tar` and `shards/part-{}.tar`: `shards`)."""
    if "{" not in text:
        return Path(text)
    head = text.split("{")[0]
    return Path(head) if head.endswith("/") or not head else Path(head).parent


def _local_data_paths(value: Any) -> List[Path]:
    """Local paths inside the data section's URL strings (a shard pattern counts as its folder)."""
    found: List[Path] = []
    if isinstance(value, dict):
        for item in value.values():
            found.extend(_local_data_paths(item))
    elif isinstance(value, (list, tuple)):
        for item in value:
            found.extend(_local_data_paths(item))
    elif isinstance(value, str) and value and "://" not in value[:12] and not value.startswith("pipe:"):
        text = value[len("file:") :] if value.startswith("file:") else value
        if "/" in text or "{" in text:
            found.append(_pattern_folder(text))
    elif isinstance(value, str) and value.startswith("file://"):
        found.append(_pattern_folder(value[len("file://") :]))
    return found
