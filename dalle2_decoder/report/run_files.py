"""What a run left in its `tracker.data_path`, read for the report: metrics, config, summary, grids, state.

Every file but `metrics.jsonl` is optional (a run that printed no summary, a wandb run without
grids on disk); a line of `metrics.jsonl` that does not parse (a process killed while writing it)
is counted and skipped, never fatal.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..failures import UsageError
from ..tracking.loggers import X_AXIS
from ..tracking.run_state import RUN_CONFIG_FILE, RUN_STATE_FILE, SUMMARY_FILE

METRICS_FILE = "metrics.jsonl"


class ReportError(UsageError):
    """The folder is not a run that a report can be made of."""


@dataclass(frozen=True)
class Grid:
    """One sample grid: its PNG, the x-axis value it was drawn at, and its captions."""

    samples_seen: int
    png: Path
    captions: List[str]


@dataclass
class RunFiles:
    folder: Path
    metrics: List[Dict[str, Any]]
    """Each line of metrics.jsonl, with its x-axis value under `samples_seen` (older files said `step`)."""
    skipped_lines: int = 0
    config: Optional[Dict[str, Any]] = None
    summary: List[str] = field(default_factory=list)
    grids: Dict[str, List[Grid]] = field(default_factory=dict)
    """Grid name (`train_examples`, ...) -> its grids, oldest first."""
    state: Dict[str, Any] = field(default_factory=dict)


def _number(value: Any) -> Optional[float]:
    """A finite number from a metrics line ("nan"/"inf" strings and others are no point on a chart)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_metrics(path: Path) -> tuple:
    """(records, unreadable line count) of a metrics.jsonl."""
    records, skipped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        x = _number(record.get(X_AXIS, record.get("step")))
        if not isinstance(record, dict) or x is None:
            skipped += 1
            continue
        record[X_AXIS] = x
        records.append(record)
    return records, skipped


def _json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_grids(samples: Path) -> Dict[str, List[Grid]]:
    grids: Dict[str, List[Grid]] = {}
    for png in sorted(samples.rglob("*.png")) if samples.is_dir() else []:
        sidecar = _json(png.with_suffix(".json")) or {}
        seen = sidecar.get(X_AXIS, sidecar.get("step"))
        if not isinstance(seen, int):
            digits = "".join(c for c in png.stem if c.isdigit())
            seen = int(digits) if digits else 0
        captions = sidecar.get("captions") if isinstance(sidecar.get("captions"), list) else []
        name = png.parent.relative_to(samples).as_posix()
        grids.setdefault(name, []).append(Grid(seen, png, [str(caption) for caption in captions]))
    for entries in grids.values():
        entries.sort(key=lambda grid: grid.samples_seen)
    return grids


def read_run(folder: Path) -> RunFiles:
    """The run in `folder`; ReportError (one line) when there is no run to report on."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder}: not a folder; give a run's tracker.data_path")
    metrics_path = folder / METRICS_FILE
    if not metrics_path.is_file():
        raise ReportError(
            f"{folder}: no {METRICS_FILE} there; give a run's tracker.data_path (the console and tensorboard "
            "loggers write it; a wandb-only run has its metrics in wandb)"
        )
    metrics, skipped = read_metrics(metrics_path)
    summary_path = folder / SUMMARY_FILE
    config = _json(folder / RUN_CONFIG_FILE)
    state = _json(folder / RUN_STATE_FILE)
    return RunFiles(
        folder=folder,
        metrics=metrics,
        skipped_lines=skipped,
        config=config if isinstance(config, dict) else None,
        summary=summary_path.read_text(errors="replace").splitlines() if summary_path.is_file() else [],
        grids=read_grids(folder / "samples"),
        state=state if isinstance(state, dict) else {},
    )


def series(metrics: List[Dict[str, Any]], key: str) -> List[tuple]:
    """(samples seen, value) of `key` over the run, in x order; a resumed run's repeated x keeps the last value."""
    points: Dict[float, float] = {}
    for record in metrics:
        value = _number(record.get(key))
        if value is not None:
            points[record[X_AXIS]] = value
    return sorted(points.items())
