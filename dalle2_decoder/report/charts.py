"""Line charts as inline SVG: no library, no script, no network, so a report opens anywhere.

One chart is a set of named series of (x, y) points drawn against common axes with round-number
ticks; each series is one `<polyline>` (with a dot per point when there are few, each dot
carrying its values in a tooltip), and a legend names the series by colour.
"""

from __future__ import annotations

import math
from html import escape
from typing import Dict, List, Sequence, Tuple

Point = Tuple[float, float]

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
WIDTH, HEIGHT = 560, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 28, 44
DOTS_UP_TO = 60
"""Series with at most this many points also get a dot (with a tooltip) per point."""


def nice_ticks(low: float, high: float, count: int = 5) -> List[float]:
    """About `count` round values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def short_number(value: float, digits: int = 4) -> str:
    """A tick label: `1.2M`, `30k`, `0.003`, `1e-05` (at most `digits` significant digits)."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e6:
        return f"{value / 1e6:.{digits}g}M"
    if magnitude >= 1e4:
        return f"{value / 1e3:.{digits}g}k"
    if magnitude < 1e-3:
        return f"{value:.{max(0, digits - 4)}e}"
    return f"{value:.{digits}g}"


def tick_labels(ticks: Sequence[float]) -> List[str]:
    """Labels for `ticks`, with as many digits as it takes to tell them apart (12.47 and 12.475 on
    a narrow axis would both read `12.47` at four)."""
    for digits in range(4, 13):
        labels = [short_number(tick, digits) for tick in ticks]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def line_chart(title: str, series: Dict[str, Sequence[Point]], *, x_label: str, y_label: str = "") -> str:
    """An SVG line chart of `series` (name -> points in x order); empty series are left out."""
    drawn = {name: list(points) for name, points in series.items() if points}
    xs = [x for points in drawn.values() for x, _ in points]
    ys = [y for points in drawn.values() for _, y in points]
    if not xs:
        xs, ys = [0.0], [0.0]
    x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(min(ys), max(ys))
    x_low, x_high = x_ticks[0], x_ticks[-1]
    y_low, y_high = y_ticks[0], y_ticks[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x_low) / ((x_high - x_low) or 1.0) * plot_w

    def py(y: float) -> float:
        return TOP + plot_h - (y - y_low) / ((y_high - y_low) or 1.0) * plot_h

    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(title)}">',
        f'<text class="title" x="{LEFT}" y="18">{escape(title)}</text>',
    ]
    for tick, label in zip(y_ticks, tick_labels(y_ticks)):
        y = py(tick)
        parts.append(f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    for tick, label in zip(x_ticks, tick_labels(x_ticks)):
        x = px(tick)
        parts.append(f'<line class="grid" x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + plot_h}"/>')
        parts.append(f'<text class="tick" x="{x:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{label}</text>')
    parts.append(f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}"/>')
    parts.append(
        f'<text class="axis" x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 8}" text-anchor="middle">{escape(x_label)}</text>'
    )
    if y_label:
        parts.append(
            f'<text class="axis" transform="translate(14 {TOP + plot_h / 2:.1f}) rotate(-90)" '
            f'text-anchor="middle">{escape(y_label)}</text>'
        )
    for index, (name, points) in enumerate(drawn.items()):
        colour = COLOURS[index % len(COLOURS)]
        coordinates = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        parts.append(
            f'<polyline class="series" data-series="{escape(name)}" data-points="{len(points)}" '
            f'points="{coordinates}" stroke="{colour}"/>'
        )
        if len(points) <= DOTS_UP_TO:
            for x, y in points:
                parts.append(
                    f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}">'
                    f"<title>{escape(name)}: {y:.6g} at {escape(x_label)} {x:g}</title></circle>"
                )
        legend_x = LEFT + 8 + (index % 3) * 160
        legend_y = TOP + 14 + (index // 3) * 14
        parts.append(f'<rect x="{legend_x}" y="{legend_y - 8}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text class="legend" x="{legend_x + 14}" y="{legend_y + 1}">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
