"""Progress output that fits where it goes: a bar on a terminal, plain lines anywhere else.

A progress bar redraws itself with carriage returns and cursor movements. On a terminal that is
one live line; in a file (a SLURM `.out`, a CI log, `> run.log 2>&1`) or a pipe it is thousands
of redraws around the real log lines. So a meter asks its stream: a terminal gets a tqdm bar; any
other stream gets plain lines, one when a phase starts and one when it ends, and one every
`interval_s` seconds in between, with the counts done of the total, the rate, the time spent and
the time left. Those lines never hold a carriage return or an escape byte.

    output = ProgressOutput(interval_s=30)
    with output.meter("epoch 1/6 training", total=250, unit="batches", samples_total=4000) as meter:
        for batch in batches:
            ...
            meter.update(1, samples=16)
            meter.show({"loss/unet1": 0.031})

A process that must not print (every rank but the main one) gets `ProgressOutput(enabled=False)`:
its meters count nothing and print nothing.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, TextIO, Union

DEFAULT_INTERVAL_S = 30.0
"""Seconds between two plain progress lines of one meter (`tracker.progress_interval_s`)."""


def is_terminal(stream: Any) -> bool:
    """Whether `stream` is a terminal (a closed or odd stream is not)."""
    isatty = getattr(stream, "isatty", None)
    if isatty is None:
        return False
    try:
        return bool(isatty())
    except (ValueError, OSError):
        return False


def duration(seconds: float) -> str:
    """`0:01:05` for 65 s (hours grow past 9 as needed); `?` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _plain(text: str) -> str:
    """`text` without control characters: a line in a file stays one line, free of escape sequences."""
    return "".join(c if c >= " " and c != "\x7f" else " " for c in text)


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


class NullMeter:
    """The meter of a process that does not print: every call does nothing."""

    def update(self, steps: int = 1, samples: int = 0) -> None:
        pass

    def show(self, values: Mapping[str, Any]) -> None:
        pass

    def close(self, stopped: bool = False) -> None:
        pass

    def __enter__(self) -> "NullMeter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(stopped=exc_type is not None)


class LineMeter:
    """Plain progress lines: at the start and end (with `boundaries`) and every `interval_s` seconds.

    `total`: steps the task takes (None when unknown); `initial`: steps already done before this
    meter started (a resumed epoch), not counted in the rate; `samples_total`: the samples those
    steps hold, when the task counts samples too. `values` given to `show` (losses, counters) end
    each line. `clock` is `time.monotonic` but for tests.
    """

    def __init__(
        self,
        what: str,
        total: Optional[int],
        *,
        stream: TextIO,
        interval_s: float,
        unit: str = "steps",
        initial: int = 0,
        samples_total: Optional[int] = None,
        samples_initial: int = 0,
        boundaries: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what = _plain(what)
        self.total = total
        self.stream = stream
        self.interval_s = interval_s
        self.unit = unit
        self.initial = self.done = initial
        self.samples_total = samples_total
        self.samples_initial = self.samples = samples_initial
        self.boundaries = boundaries
        self.clock = clock
        self.values: Dict[str, Any] = {}
        self.started = self.last_line = clock()
        self.closed = False
        if boundaries:
            self._write(self.line(state="started"))

    def update(self, steps: int = 1, samples: int = 0) -> None:
        """`steps` more done (holding `samples` samples); writes a line when the interval has passed."""
        self.done += steps
        self.samples += samples
        if self.boundaries and self.total is not None and self.done >= self.total:
            return  # the end: `close` says so, with the final counts
        now = self.clock()
        if now - self.last_line >= self.interval_s:
            self.last_line = now
            self._write(self.line(now=now))

    def show(self, values: Mapping[str, Any]) -> None:
        """Values to end the next lines with (merged into those shown so far)."""
        self.values.update(values)

    def close(self, stopped: bool = False) -> None:
        """The last line (with `boundaries`): done, or `stopped` before the end."""
        if self.closed:
            return
        self.closed = True
        if self.boundaries:
            self._write(self.line(state="stopped" if stopped else "done"))

    def line(self, *, now: Optional[float] = None, state: str = "") -> str:
        """`epoch 1/6 training 48%: 120/250 batches, 1920/4000 samples, 35.2 samples/s, 0:00:54 elapsed,
        ETA 0:00:59 | loss/unet1 0.0312` (`state`: started, done or stopped, in place of the ETA)."""
        now = self.clock() if now is None else now
        elapsed = now - self.started
        head = self.what
        if self.total:
            head += f" {min(100, int(100 * self.done / self.total))}%"
        parts = [f"{self.done}/{self.total} {self.unit}" if self.total is not None else f"{self.done} {self.unit}"]
        if self.samples_total is not None or self.samples:
            parts.append(
                f"{self.samples}/{self.samples_total} samples" if self.samples_total else f"{self.samples} samples"
            )
        counted, rate_unit = (
            (self.samples - self.samples_initial, "samples/s")
            if self.samples_total is not None or self.samples
            else (self.done - self.initial, f"{self.unit}/s")
        )
        steps_done = self.done - self.initial
        if state == "started":
            parts.append("started")
        else:
            if elapsed > 0 and counted > 0:
                parts.append(f"{counted / elapsed:.1f} {rate_unit}")
            parts.append(f"{duration(elapsed)} elapsed")
            if state:
                parts.append(state)
            elif self.total is not None and steps_done > 0 and elapsed > 0:
                left = max(0, self.total - self.done) * elapsed / steps_done
                parts.append(f"ETA {duration(left)}")
        text = f"{head}: {', '.join(parts)}"
        if self.values:
            text += " | " + " | ".join(
                f"{_plain(str(key))} {_plain(_shown(value))}" for key, value in self.values.items()
            )
        return text

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def __enter__(self) -> "LineMeter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(stopped=exc_type is not None)


class BarMeter:
    """A tqdm bar on a terminal; it disappears when closed (the log lines stay)."""

    def __init__(
        self,
        what: str,
        total: Optional[int],
        *,
        stream: TextIO,
        unit: str = "steps",
        initial: int = 0,
        samples_total: Optional[int] = None,
        samples_initial: int = 0,
    ):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total, initial=initial, desc=what, unit=f" {unit}", file=stream, dynamic_ncols=True, leave=False
        )
        self.counts_samples = samples_total is not None
        self.samples = self.samples_initial = samples_initial
        self.started = time.monotonic()
        self.values: Dict[str, Any] = {}

    def update(self, steps: int = 1, samples: int = 0) -> None:
        self.samples += samples
        self._postfix()  # not drawn by itself (refresh=False): tqdm draws it with the update, at its own pace
        self.bar.update(steps)

    def show(self, values: Mapping[str, Any]) -> None:
        self.values.update(values)
        self._postfix()

    def _postfix(self) -> None:
        shown = {str(key): _shown(value) for key, value in self.values.items()}
        if self.counts_samples:
            elapsed = time.monotonic() - self.started
            if elapsed > 0 and self.samples > self.samples_initial:
                shown["samples/s"] = f"{(self.samples - self.samples_initial) / elapsed:.1f}"
        self.bar.set_postfix(shown, refresh=False)

    def close(self, stopped: bool = False) -> None:
        self.bar.close()

    def __enter__(self) -> "BarMeter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(stopped=exc_type is not None)


Meter = Union[LineMeter, BarMeter, NullMeter]


@dataclass(frozen=True)
class ProgressOutput:
    """How this process shows progress: where, how often, and whether at all.

    `stream`: None means `sys.stderr` at the time a meter starts (as the bars always used);
    `terminal`: None asks the stream. `interval_s`: seconds between plain lines.
    """

    interval_s: float = DEFAULT_INTERVAL_S
    enabled: bool = True
    stream: Optional[TextIO] = None
    terminal: Optional[bool] = None
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)

    def meter(
        self,
        what: str,
        total: Optional[int],
        *,
        unit: str = "steps",
        initial: int = 0,
        samples_total: Optional[int] = None,
        samples_initial: int = 0,
        boundaries: bool = True,
    ) -> Meter:
        """A meter of a task of `total` steps (see `LineMeter`). `boundaries`: plain lines at its start
        and end too; false for a task inside a phase that has its own (a U-Net's sampling steps)."""
        if not self.enabled:
            return NullMeter()
        stream = self.stream if self.stream is not None else sys.stderr
        terminal = is_terminal(stream) if self.terminal is None else self.terminal
        if terminal:
            return BarMeter(
                what,
                total,
                stream=stream,
                unit=unit,
                initial=initial,
                samples_total=samples_total,
                samples_initial=samples_initial,
            )
        return LineMeter(
            what,
            total,
            stream=stream,
            interval_s=self.interval_s,
            unit=unit,
            initial=initial,
            samples_total=samples_total,
            samples_initial=samples_initial,
            boundaries=boundaries,
            clock=self.clock,
        )


def progress_output(progress: Union[bool, ProgressOutput, None]) -> Optional[ProgressOutput]:
    """What a `progress=` argument means: a `ProgressOutput` as it is, True the default one, else None."""
    if isinstance(progress, ProgressOutput):
        return progress
    return ProgressOutput() if progress else None
