"""The report's SVG charts: axes a reader can use (the browser test is in test_operator_run.py)."""

import re

import pytest

from dalle2_decoder.report.charts import line_chart, nice_ticks, tick_labels


@pytest.mark.parametrize(
    "low, high",
    [(12.4714, 12.4803), (0.94, 1.0), (1e-5, 3e-5), (0, 2_000_000), (99_990, 100_010), (5.0, 5.0)],
)
def test_tick_labels_tell_every_tick_apart(low, high):
    ticks = nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high
    labels = tick_labels(ticks)
    assert len(set(labels)) == len(labels), labels
    for tick, label in zip(ticks, labels):  # and each label reads as its tick
        scale = {"k": 1e3, "M": 1e6}.get(label[-1], 1.0)
        number = float(label.rstrip("kM")) * scale
        assert number == pytest.approx(tick, rel=1e-3, abs=1e-12), (tick, label)


def test_a_narrow_axis_of_samples_per_second_shows_distinct_labels():
    svg = line_chart("samples/s", {"train/samples_per_s": [(40, 12.4714), (88, 12.4803)]}, x_label="samples seen")
    y_labels = re.findall(r'<text class="tick" x="\d+" y="[\d.]+" text-anchor="end">([^<]+)</text>', svg)
    assert len(y_labels) >= 3 and len(set(y_labels)) == len(y_labels), y_labels
