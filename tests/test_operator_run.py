"""What an operator gets from one real training run redirected to a file, as on SLURM or CI.

One run of the tiny decoder (2 epochs of 12 batches, each made to last at least MIN_STEP_S),
`train_decoder.py ... > run.log 2>&1`, with the tensorboard logger, progress lines every half second
and a `keep_last: 2` saver; then: the log file (plain lines, no carriage return or escape byte, one
progress line per interval, counters named), the TensorBoard event files read back with
TensorBoard's own reader, the kept files, and the HTML report rendered in a real headless Chromium.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
from PIL import Image

from .conftest import REPO_ROOT
from .training_fixtures import tiny_config, write_tiny_demo

INTERVAL_S = 0.5
MIN_STEP_S = 0.2
"""Each training step lasts at least this long (12 steps an epoch: 2.4 s, four intervals or more)."""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(data path, log file text, log file bytes, [(seconds since start, read number, line)]: each line as it
    reached the file, and in which of the test's reads)."""
    root = tmp_path_factory.mktemp("operator")
    data = write_tiny_demo(root / "demo")
    data_path = root / "run"
    config = tiny_config(data, data_path, epochs=2, epoch_samples=48, save_every_n_samples=24)
    config["tracker"]["log"] = {"log_type": "tensorboard", "auto_resume": True}
    config["tracker"]["progress_interval_s"] = INTERVAL_S
    config["tracker"]["save"].append(
        {"save_to": "local", "save_latest_to": "kept/latest_{samples_seen:03d}.pth", "keep_last": 2}
    )
    path = root / "config.json"
    path.write_text(json.dumps(config))
    log = root / "run.log"
    arrivals: List[Tuple[float, int, str]] = []
    with open(log, "wb") as handle:  # a file, as SLURM's --output: not a terminal
        process = subprocess.Popen(
            # the training command through tests/sample_trace.py, which only makes each step last at
            # least MIN_STEP_S: a phase then spans several intervals on however fast a machine
            [sys.executable, str(REPO_ROOT / "tests" / "sample_trace.py"), "--config_file", str(path)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=root,
            env={
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(REPO_ROOT),
                "SAMPLE_TRACE": str(root / "trace"),
                "SAMPLE_TRACE_MIN_STEP_S": str(MIN_STEP_S),
            },
        )
        # Read the file while the run writes it, noting when each line arrives: the lines say the
        # elapsed time only to the second, too coarse to check an interval of one second.
        started, pending = time.monotonic(), b""
        with open(log, "rb") as reader:
            for read in itertools.count():
                finished = process.poll() is not None
                pending += reader.read()
                *complete, pending = pending.split(b"\n")
                now = time.monotonic() - started
                arrivals += [(now, read, line.decode(errors="replace")) for line in complete]
                if finished:
                    break
                if now > 600:
                    process.kill()
                    process.wait()
                    pytest.fail(f"the run took over 600 s:\n{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.02)
    raw = log.read_bytes()
    assert process.returncode == 0, raw.decode(errors="replace")[-3000:]
    return data_path, raw.decode(), raw, arrivals


PROGRESS = re.compile(r"epoch (\d)/2 (training|validation|sample grids) (\d+)%: ")


def test_the_log_file_holds_plain_progress_lines_one_per_interval_and_named_counters(run):
    _, text, raw, arrivals = run
    assert b"\r" not in raw and b"\x1b" not in raw  # no bar redraws, no cursor movement
    lines = text.splitlines()
    for epoch in (1, 2):
        title = f"epoch {epoch}/2"
        assert f"{title} training 0%: 0/12 batches, 0/48 samples, started" in lines
        (done,) = [
            line for line in lines if re.match(rf"{title} training 100%: 12/12 batches, 48/48 samples, .* done", line)
        ]
        assert f"| samples seen {48 * epoch} | optimizer steps {12 * epoch}" in done
        for phase in ("validation", "sample grids"):
            assert any(line.startswith(f"{title} {phase} 0%") and line.endswith("started") for line in lines)
            assert any(line.startswith(f"{title} {phase} 100%") and ", done" in line for line in lines)
    assert any(re.search(r"training \d+%: .* ETA \d+:\d\d:\d\d \| samples seen \d+", line) for line in lines)

    # One line per interval. Within a phase, a line between its start and end comes no sooner than
    # INTERVAL_S after the one before it ...
    # (Two lines that reached the file between the same two reads of the test, a test held up by the
    # other processes on the machine, give no time apart: that pair is not measured.)
    progress = [(when, read, line, PROGRESS.match(line)) for when, read, line in arrivals if PROGRESS.match(line)]
    last_of: Dict[Tuple[str, str], Tuple[float, int]] = {}
    periodic = measured = 0
    for when, read, line, match in progress:
        phase = match.group(1, 2)
        if "ETA" in line:
            periodic += 1
            before, read_before = last_of[phase]
            if read != read_before:
                measured += 1
                assert when - before >= INTERVAL_S - 0.1, (line, when, before)
        last_of[phase] = (when, read)
    # ... and no later than the first update after it (a batch, a grid), so never a long silence in the
    # log while the run works: the longest gap is the interval plus one step (the first step of a run
    # also starts the data loader's worker)
    gaps = [later[0] - earlier[0] for earlier, later in zip(progress, progress[1:])]
    assert max(gaps) <= INTERVAL_S + 3.0, list(zip(gaps, [line for _, _, line, _ in progress[1:]]))
    assert periodic >= 4 and measured >= periodic // 2  # phases of several intervals each
    assert len(lines) < 120  # the whole log of the run: no redraws

    # metric lines count training samples seen, and say so; optimizer steps are their own value
    metric_lines = [line for line in lines if "train/loss/unet1" in line]
    assert metric_lines and all(line.startswith("samples seen ") for line in metric_lines)
    assert metric_lines[0].startswith("samples seen 40 |") and metric_lines[0].endswith("| optimizer_steps 10")
    assert not any(re.match(r"step \d", line) for line in lines)


def test_tensorboard_event_files_hold_the_runs_scalars_images_and_config(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data_path = run[0]
    events = EventAccumulator(str(data_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    records = [json.loads(line) for line in (data_path / "metrics.jsonl").read_text().splitlines()]
    logged = {key for record in records for key in record if key not in ("samples_seen", "time")}
    assert {"train/loss/unet1", "train/lr/unet1", "train/samples_per_s", "val/loss/unet1"} <= logged
    assert set(events.Tags()["scalars"]) == logged
    for key in logged:  # the same values against the same x-axis (samples seen) as metrics.jsonl
        expected = [(record["samples_seen"], record[key]) for record in records if key in record]
        read = [(event.step, event.value) for event in events.Scalars(key)]
        assert [step for step, _ in read] == [step for step, _ in expected], key
        assert np.allclose([value for _, value in read], [value for _, value in expected], rtol=1e-6), key
    assert [event.step for event in events.Scalars("train/loss/unet1")] == [40, 88]
    for name in ("train_examples", "test_examples"):
        pngs = sorted((data_path / "samples" / name).glob("*.png"))
        images = events.Images(name)
        assert [event.step for event in images] == [int(png.stem.split("_")[1]) for png in pngs] == [24, 48, 72, 96]
        # the grid itself: the PNG's pixels, at its (upscaled, captioned) size
        import io

        shown = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
        assert np.array_equal(shown, np.asarray(Image.open(pngs[-1]).convert("RGB")))
        assert shown.shape[0] > 128 and shown.shape[1] >= 4 * 128
        captions = events.Tensors(f"{name}/captions/text_summary")[-1].tensor_proto.string_val[0].decode()
        assert "1. real: a " in captions and "2. generated: a " in captions
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"log_type": "tensorboard"' in config and '"keep_last": 2' in config


def test_keep_last_leaves_the_two_newest_files_of_its_saver_and_every_other_file(run):
    data_path = run[0]
    assert sorted(path.name for path in (data_path / "kept").iterdir()) == ["latest_072.pth", "latest_096.pth"]
    # the other savers' files are untouched: latest, best, the model save and the metadata
    for name in ("latest.pth", "best.pth", "model.safetensors", "meta/config.json"):
        assert (data_path / name).is_file(), name
    state = json.loads((data_path / "run_state.json").read_text())
    (tracked,) = state["saved_files"].values()
    assert [Path(path).name for path in tracked] == ["latest_072.pth", "latest_096.pth"]


def chromium() -> str:
    """Debian's Chromium (.ci/run installs it; as root with apt-get, installed here when missing)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        from .slurm_cluster import apt_lock

        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        with apt_lock():
            for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
                subprocess.run(command, env=env, capture_output=True, timeout=900)
        found = shutil.which("chromium")
    if found is None:
        pytest.fail("Chromium is not installed (Debian: apt-get install chromium)")
    return found


def headless(browser: str, profile: Path, *arguments: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    return subprocess.run([browser, *flags, *arguments], capture_output=True, text=True, timeout=120)


def test_the_report_renders_in_headless_chromium_with_its_plots_and_no_console_message(run, tmp_path):
    from dalle2_decoder.report import main as report_main

    browser = chromium()
    data_path = run[0]
    page = tmp_path / "report.html"
    assert report_main([str(data_path), "--out", str(page)]) == 0
    html = page.read_text()
    # self-contained: nothing fetched from anywhere (the svg namespace is a name, not a request)
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html) and "<link" not in html
    curves = html.count('<polyline class="series"')
    drawn_series = re.findall(r'<polyline class="series" data-series="([^"]+)"', html)
    assert sorted(drawn_series) == ["train/loss/unet1", "train/lr/unet1", "train/samples_per_s", "val/loss/unet1"]

    dom = headless(browser, tmp_path / "profile", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []  # no script error, no warning
    # the page's script counted the curves the browser laid out with a size: every one of them
    drawn = re.search(r'data-charts-drawn="(\d+)"', dom.stdout)
    assert drawn is not None and int(drawn.group(1)) == curves
    for title in ("Loss, U-Net 1", "Learning rate", "Training samples per second", "train_examples"):
        assert title in dom.stdout
    assert dom.stdout.count("data:image/png;base64,") >= 2

    shot = tmp_path / "report.png"
    picture = headless(
        browser,
        tmp_path / "profile",
        "--hide-scrollbars",
        "--window-size=1200,1400",
        f"--screenshot={shot}",
        page.as_uri(),
    )
    assert picture.returncode == 0 and shot.is_file(), picture.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # a page with charts and pictures, not a blank one
