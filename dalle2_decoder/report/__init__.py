"""A training run on one self-contained HTML page: `python -m dalle2_decoder.report RUN_DIR` / `dalle2-report`.

    dalle2-report .tracker-data/demo                 # writes .tracker-data/demo/report.html
    dalle2-report RUN_DIR --out report.html --max-grids 6

From what the run left in its `tracker.data_path` (`metrics.jsonl`, `run_config.json`,
`summary.txt`, `samples/`, `run_state.json`): loss curves per U-Net (training and validation),
the evaluation metrics, the learning rate, samples/s, any other logged value, the sample grids
over time and the config. Everything is inside the one file (charts as inline SVG, grids as
embedded PNG): it opens offline, attached to a mail or copied off a cluster. The x-axis is
training samples seen, as in the logs, wandb and TensorBoard. Exit statuses as the other
commands': 0 written, 2 a folder that holds no run (one line on stderr).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
from html import escape
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .charts import line_chart
from .run_files import Grid, ReportError, RunFiles, read_run, series

__all__ = ["ReportError", "build_report", "write_report", "main"]

X_LABEL = "samples seen"
NOT_PLOTTED = {"samples_seen", "step", "time", "epoch", "optimizer_steps", "eval/samples", "eval/seconds"}
"""Keys of metrics.jsonl that are counters or bookkeeping rather than curves."""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1220px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px; }
.meta { color: #555; font-size: 13px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
svg.chart { background: #fff; border: 1px solid #ddd; }
svg.chart .title { font-size: 13px; font-weight: 600; }
svg.chart .tick, svg.chart .legend { font-size: 10px; fill: #444; }
svg.chart .axis { font-size: 11px; fill: #444; }
svg.chart .grid { stroke: #eee; } svg.chart .frame { fill: none; stroke: #bbb; }
svg.chart polyline.series { fill: none; stroke-width: 1.8; }
figure { margin: 0 0 14px 0; } figcaption { font-size: 12px; color: #444; }
.strip { display: flex; gap: 10px; overflow-x: auto; } .strip img.grid { height: 160px; image-rendering: auto; }
img.grid { image-rendering: pixelated; max-width: 100%; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 10px; font-size: 12px; overflow-x: auto; }
"""

SELF_CHECK = """
// Counts the curves the browser actually laid out (a polyline with a size): a test reads it from the DOM.
const drawn = Array.from(document.querySelectorAll("polyline.series")).filter((line) => {
  const box = line.getBBox();
  return box.width > 0 || box.height > 0;
});
document.documentElement.dataset.chartsDrawn = String(drawn.length);
"""


def chart_groups(metrics: List[Dict]) -> Dict[str, Dict[str, List[tuple]]]:
    """Chart title -> series: loss per U-Net (train and val), evaluation metrics, learning rates,
    samples/s, then one chart per other logged value."""
    keys: List[str] = []
    for record in metrics:
        keys += [key for key in record if key not in keys]
    numeric = [key for key in keys if key not in NOT_PLOTTED and series(metrics, key)]
    groups: Dict[str, Dict[str, List[tuple]]] = {}
    used = set()
    unets = sorted({key.rsplit("unet", 1)[1] for key in numeric if "/loss/unet" in key}, key=lambda n: (len(n), n))
    for number in unets:
        names = [key for key in numeric if key.endswith(f"/loss/unet{number}")]
        groups[f"Loss, U-Net {number}"] = {key: series(metrics, key) for key in names}
        used.update(names)
    for key in numeric:
        if key.startswith("eval/"):
            groups[f"Evaluation: {key[len('eval/') :]}"] = {key: series(metrics, key)}
            used.add(key)
    rates = [key for key in numeric if key.startswith("train/lr/")]
    if rates:
        groups["Learning rate"] = {key: series(metrics, key) for key in rates}
        used.update(rates)
    if "train/samples_per_s" in numeric:
        groups["Training samples per second"] = {"train/samples_per_s": series(metrics, "train/samples_per_s")}
        used.add("train/samples_per_s")
    for key in numeric:
        if key not in used:
            groups[key] = {key: series(metrics, key)}
    return groups


def _spread(grids: List[Grid], count: int) -> List[Grid]:
    """`count` grids evenly spread over the run, the first and the last included."""
    if len(grids) <= count:
        return grids
    if count == 1:
        return grids[-1:]
    picks = sorted({round(i * (len(grids) - 1) / (count - 1)) for i in range(count)})
    return [grids[i] for i in picks]


def _image(grid: Grid, css: str, alt: str) -> str:
    data = base64.b64encode(grid.png.read_bytes()).decode("ascii")
    return f'<img class="{css}" src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def _grids_section(run: RunFiles, max_grids: int) -> str:
    if not run.grids:
        return "<p>No sample grids in this run's folder.</p>"
    parts = []
    for name, grids in run.grids.items():
        latest = grids[-1]
        parts.append(f"<h3>{escape(name)}</h3>")
        # the captions are drawn under each image in the PNG; the alt text carries them too
        alt = f"{name} at {latest.samples_seen} samples seen: " + "; ".join(latest.captions)
        parts.append(
            f"<figure>{_image(latest, 'grid', alt)}"
            f"<figcaption>latest: {latest.samples_seen} samples seen</figcaption></figure>"
        )
        if len(grids) > 1:
            shown = _spread(grids, max_grids)
            parts.append(
                f"<p class='meta'>Over the run ({len(shown)} of {len(grids)} grids, oldest first):</p>"
                "<div class='strip'>"
            )
            for grid in shown:
                parts.append(
                    f"<figure>{_image(grid, 'grid', f'{name} at {grid.samples_seen}')}"
                    f"<figcaption>{grid.samples_seen} samples seen</figcaption></figure>"
                )
            parts.append("</div>")
    return "\n".join(parts)


def build_report(run_dir: Path, *, max_grids: int = 12) -> str:
    """The HTML page of the run in `run_dir` (ReportError when there is none)."""
    run = read_run(Path(run_dir))
    state = run.state
    last = max((record["samples_seen"] for record in run.metrics), default=0)
    facts = [f"{len(run.metrics)} metric records", f"up to {last:g} samples seen"]
    if state.get("run_id"):
        facts.insert(0, f"run {escape(str(state['run_id']))}")
    if "finished" in state:
        facts.append("finished" if state["finished"] else "not finished (interrupted or running)")
    if state.get("attempts", 1) > 1:
        facts.append(f"{state['attempts']} attempts (auto-resumed)")
    if run.skipped_lines:
        facts.append(f"{run.skipped_lines} unreadable line(s) of metrics.jsonl skipped")
    charts = [
        line_chart(title, curves, x_label=X_LABEL)
        for title, curves in chart_groups(run.metrics).items()
        if any(curves.values())
    ]
    config = json.dumps(run.config, indent=2) if run.config is not None else "not recorded (no run_config.json)"
    summary = "\n".join(run.summary) if run.summary else "not recorded (no summary.txt)"
    made = datetime.datetime.now().isoformat(timespec="seconds")
    title = f"dalle2-decoder run: {run.folder.resolve().name}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>",
            f"<h1>{escape(title)}</h1>",
            f"<p class='meta'>{escape(str(run.folder.resolve()))} · {' · '.join(facts)} · report made {made}</p>",
            "<h2>Summary</h2>",
            f"<pre>{escape(summary)}</pre>",
            "<h2>Curves</h2>",
            f"<p class='meta'>x-axis: training samples seen (summed over processes), as in the logs, wandb and "
            f"TensorBoard. {len(charts)} chart(s).</p>",
            f"<div class='charts'>{''.join(charts) if charts else '<p>No values logged yet.</p>'}</div>",
            "<h2>Sample grids</h2>",
            _grids_section(run, max_grids),
            "<h2>Config</h2>",
            f"<details><summary>The resolved config (secrets masked)</summary><pre>{escape(config)}</pre></details>",
            f"<script>{SELF_CHECK}</script>",
            "</body></html>",
        ]
    )


def write_report(run_dir: Path, out: Optional[Path] = None, *, max_grids: int = 12) -> Path:
    """Write the report (default `RUN_DIR/report.html`); returns its path."""
    from ..common.files import atomic_write_text

    target = Path(out) if out is not None else Path(run_dir) / "report.html"
    atomic_write_text(target, build_report(Path(run_dir), max_grids=max_grids))
    return target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalle2-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's tracker.data_path (holds metrics.jsonl)")
    parser.add_argument(
        "--out", metavar="PATH", default=None, help="where to write the page (default RUN_DIR/report.html)"
    )
    parser.add_argument(
        "--max-grids",
        "--max_grids",
        dest="max_grids",
        type=int,
        default=12,
        metavar="N",
        help="sample grids shown over time per grid name, spread over the run (default 12)",
    )
    parser.add_argument("--debug", action="store_true", help="print the full traceback of errors too")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..failures import EXIT_OK, guarded

    args = build_parser().parse_args(argv)

    def body() -> int:
        if args.max_grids < 1:
            raise ReportError(f"--max-grids must be at least 1 (got {args.max_grids})")
        path = write_report(Path(args.run_dir), None if args.out is None else Path(args.out), max_grids=args.max_grids)
        print(f"wrote {path}", flush=True)
        return EXIT_OK

    return guarded(body, debug=args.debug)
