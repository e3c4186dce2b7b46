"""Progress output: bars on a terminal, plain lines elsewhere (one per interval, and at a phase's start and end)."""

import io
import re

import pytest
import torch

from dalle2_decoder.common.progress import BarMeter, LineMeter, NullMeter, ProgressOutput


class Clock:
    """A clock the test moves by hand, so that "one line per interval" is exact."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_file_gets_a_line_at_the_start_one_per_interval_and_one_at_the_end():
    clock, stream = Clock(), io.StringIO()
    output = ProgressOutput(interval_s=30, stream=stream, clock=clock)
    with output.meter("epoch 2/6 training", total=100, unit="batches", samples_total=400) as meter:
        assert isinstance(meter, LineMeter)
        for _ in range(100):
            clock.now += 1.0  # a batch a second: 100 s in all
            meter.update(1, samples=4)
            meter.show({"loss/unet1": 0.03125, "samples seen": 4 * meter.done})
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    assert lines[0] == "epoch 2/6 training 0%: 0/100 batches, 0/400 samples, started"
    # one line every 30 s: at 30, 60 and 90 s, none in between, with the counts, rate, times and values
    assert lines[1:4] == [
        "epoch 2/6 training 30%: 30/100 batches, 120/400 samples, 4.0 samples/s, 0:00:30 elapsed, ETA 0:01:10 "
        "| loss/unet1 0.03125 | samples seen 116",
        "epoch 2/6 training 60%: 60/100 batches, 240/400 samples, 4.0 samples/s, 0:01:00 elapsed, ETA 0:00:40 "
        "| loss/unet1 0.03125 | samples seen 236",
        "epoch 2/6 training 90%: 90/100 batches, 360/400 samples, 4.0 samples/s, 0:01:30 elapsed, ETA 0:00:10 "
        "| loss/unet1 0.03125 | samples seen 356",
    ]
    assert lines[4] == (
        "epoch 2/6 training 100%: 100/100 batches, 400/400 samples, 4.0 samples/s, 0:01:40 elapsed, done "
        "| loss/unet1 0.03125 | samples seen 400"
    )
    assert len(lines) == 5


def test_a_resumed_phase_counts_its_rate_and_eta_from_what_it_did_itself():
    clock, stream = Clock(), io.StringIO()
    meter = ProgressOutput(interval_s=10, stream=stream, clock=clock).meter(
        "epoch 1/1 training", total=50, unit="batches", initial=40, samples_total=200, samples_initial=160
    )
    clock.now += 10
    meter.update(5, samples=20)  # 5 batches in 10 s: 5 left take 10 s more
    assert stream.getvalue().splitlines()[-1] == (
        "epoch 1/1 training 90%: 45/50 batches, 180/200 samples, 2.0 samples/s, 0:00:10 elapsed, ETA 0:00:10"
    )


def test_a_stopped_phase_says_so_and_an_inner_task_prints_no_start_or_end():
    clock, stream = Clock(), io.StringIO()
    output = ProgressOutput(interval_s=5, stream=stream, clock=clock)
    with pytest.raises(KeyboardInterrupt):
        with output.meter("epoch 1/2 validation", total=4, unit="batches"):
            clock.now += 3
            raise KeyboardInterrupt
    assert stream.getvalue().splitlines()[-1].endswith("0:00:03 elapsed, stopped")
    inner = io.StringIO()
    with ProgressOutput(interval_s=5, stream=inner, clock=clock).meter("sampling U-Net 1", 20, boundaries=False) as m:
        for _ in range(20):
            clock.now += 1
            m.update(1)
    assert [line.split(":")[0] for line in inner.getvalue().splitlines()] == [
        f"sampling U-Net 1 {percent}%" for percent in (25, 50, 75, 100)
    ]


def test_a_terminal_gets_a_bar_and_a_process_that_does_not_log_gets_nothing():
    terminal = Terminal()
    with ProgressOutput(stream=terminal).meter("epoch 1/1 training", total=3, unit="batches") as meter:
        assert isinstance(meter, BarMeter)
        for _ in range(3):
            meter.update(1, samples=4)
    assert "\r" in terminal.getvalue() and "epoch 1/1 training" in terminal.getvalue()
    quiet = io.StringIO()
    meter = ProgressOutput(stream=quiet, enabled=False).meter("epoch 1/1 training", total=3)
    assert isinstance(meter, NullMeter)
    meter.update(3)
    meter.close()
    assert quiet.getvalue() == ""


def test_a_title_with_control_characters_still_gives_one_plain_line():
    stream = io.StringIO()
    ProgressOutput(stream=stream).meter("bad\rname\x1b[2K", total=1).close()
    started, done = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    assert started.startswith("bad name [2K 0%") and done.startswith("bad name [2K 0%")


def test_decoder_sampling_shows_lines_per_unet_step_in_a_file(compute_threads):
    from dalle2_decoder.models import Decoder, Unet

    from .conftest import TINY_UNET_OPTIONS

    torch.manual_seed(0)
    unet = Unet(dim=8, image_embed_dim=12, dim_mults=(1, 2), **TINY_UNET_OPTIONS)
    decoder = Decoder([unet], image_sizes=[8], timesteps=4, beta_schedule="cosine")
    stream = io.StringIO()
    decoder.sample(
        image_embed=torch.randn(1, 12),
        progress=ProgressOutput(interval_s=0, stream=stream),
    )
    lines = stream.getvalue().splitlines()
    assert [re.sub(r", [\d.]+ steps/s.*", "", line) for line in lines] == [
        f"sampling U-Net 1 (ddpm, 4 steps) {25 * n}%: {n}/4 steps" for n in (1, 2, 3, 4)
    ]
