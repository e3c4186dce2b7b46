"""How every command reports a failure: one line per problem, no traceback, an exit status by kind.

Exit statuses (the same for `train_decoder.py` / `dalle2-train-decoder`, `dalle2-evaluate-decoder`
and `python -m dalle2_decoder.data.prepare`; docs/TROUBLESHOOTING.md lists the usual causes):

    0  done
    1  configuration: a config with problems, or files the config names (as `--check` always has)
    2  usage: bad command-line arguments (argparse's own status for its errors, kept for ours)
    3  data: missing shards or embeddings, too much bad data, embeddings of the wrong size
    4  checkpoint: a file to load that is missing, unreadable, or does not fit the model
    5  I/O or environment: a path that is not writable, no space left, a device that is absent
    6  stopped: the run ended before its last epoch with its state saved: by a stop signal (SIGTERM,
       SIGINT, SIGUSR1; the run resumes from the checkpoint just saved; 0 instead under torchrun /
       `accelerate launch`, see `stopping.exit_status_after_stop`), or because it could not go on
       (e.g. non-finite losses; the last good checkpoint is kept)
    70 a bug: an unexpected error, printed with its traceback (please report it; EX_SOFTWARE)
    130 interrupted: a second Ctrl-C, which stops at once without saving

`--debug` prints the traceback of the project's own errors as well.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import traceback
from typing import Callable, ClassVar, List, Optional, Sequence, Tuple

import attrs

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_USAGE = 2
EXIT_BUG = 70
EXIT_DATA = 3
EXIT_CHECKPOINT = 4
EXIT_IO = 5
EXIT_STOPPED = 6
EXIT_INTERRUPTED = 130


@attrs.frozen
class Problem:
    """One problem found before a run (see `dalle2_decoder.preflight`): its kind (an exit status) and its line."""

    kind: int
    message: str


class PreflightError(Exception):
    """Problems found before anything ran; the exit status is the most basic kind among them."""

    def __init__(self, problems: Sequence[Problem], source: str = ""):
        self.problems = list(problems)
        self.source = source
        super().__init__("\n".join(problem.message for problem in self.problems))

    @property
    def exit_status(self) -> int:
        """The most basic kind among the problems (a bad config before the data it names)."""
        return min(problem.kind for problem in self.problems)


class UsageError(Exception):
    """A command-line argument that cannot work (checked before anything is loaded)."""

    exit_status: ClassVar[int] = EXIT_USAGE


# --- classifying errors -----------------------------------------------------------------------
#
# Every error the user can fix declares its kind where it is defined, as a class attribute
# `exit_status: ClassVar[int] = EXIT_...` (inherited by subclasses), so this module needs no
# import of the packages whose errors it reports: a failure while importing torch, or any other
# module, is still reported. A class that also sets `reported_verbatim = True` (a configuration's
# problems) is printed as its message, which already holds its header line.


def exit_status_of(error: BaseException) -> Optional[int]:
    """The exit status `error`'s class declares (`exit_status`, a class attribute or, where the status
    depends on the error's contents, a property), or None where it declares none. Only the class is
    asked whether it declares one: another library's error carrying an `exit_status` of its own
    is not ours to classify."""
    if not hasattr(type(error), "exit_status"):
        return None
    status = error.exit_status
    return status if isinstance(status, int) and not isinstance(status, bool) else None


_WORKER_WRAPPED = re.compile(r"^Caught (\w+) in DataLoader worker process (\d+)\.\s*Original Traceback", re.S)
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
"""Errors of a write the user can fix (space, quota, permissions): reported as I/O wherever they are wrapped."""
_TORCH_WRITE_FAILURE = ("iostream error", "PytorchStreamWriter failed", "file write failed", "unexpected pos")


def clean_message(error: BaseException) -> str:
    """The message of an error as the user should read it.

    An error raised in a DataLoader worker comes back with torch's "Caught X in DataLoader worker
    process N. Original Traceback ..." around it: only the original message is kept.
    """
    text = str(error)
    if _WORKER_WRAPPED.match(text):
        name = _WORKER_WRAPPED.match(text).group(1)
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        # the last traceback line is "module.ErrorName: message"
        match = re.match(rf"^[\w.]*{name}: (.*)$", last)
        text = match.group(1) if match else last
    return text.strip() or type(error).__name__


def _chain(error: BaseException) -> List[BaseException]:
    seen: List[BaseException] = []
    current: Optional[BaseException] = error
    while current is not None and all(current is not other for other in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _existing(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def free_bytes(path: str) -> Optional[int]:
    try:
        return shutil.disk_usage(_existing(path)).free
    except OSError:
        return None


def _os_error_line(error: OSError) -> str:
    where = error.filename if error.filename is not None else None
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device while writing {where}" if where else "no space left on device"
    if error.errno == errno.EROFS:
        return f"{where}: read-only file system (choose a writable path)" if where else "read-only file system"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied" if where else "permission denied"
    reason = error.strerror or str(error)
    return f"{where}: {reason}" if where else reason


def describe(error: BaseException, write_paths: Sequence[str] = ()) -> Optional[Tuple[int, List[str]]]:
    """(exit status, lines) for an error the user can fix, or None for a bug.

    `write_paths`: where the command writes (data path, save folders); a failed write that does
    not say why (torch's `basic_ios::clear: iostream error`) is checked against their free space.
    """
    if getattr(type(error), "reported_verbatim", False) and exit_status_of(error) is not None:
        # a configuration's problems: the message is already the report, header line included
        return exit_status_of(error), str(error).splitlines()
    if isinstance(error, PreflightError):
        head = (
            [f"{error.source}: {len(error.problems)} problem{'s' if len(error.problems) != 1 else ''}"]
            if error.source
            else []
        )
        return error.exit_status, head + [("  " if head else "error: ") + problem.message for problem in error.problems]
    if isinstance(error, UsageError):
        return EXIT_USAGE, [f"error: {line}" for line in str(error).splitlines()]
    chain = _chain(error)
    for link in chain:
        if isinstance(link, OSError) and link.errno in _WRITE_ERRNOS:
            prefix = clean_message(error) if link is not error else ""
            line = _os_error_line(link)
            return EXIT_IO, [f"error: {line}" + (f" ({prefix})" if prefix and line not in prefix else "")]
    if any(isinstance(link, RuntimeError) and any(s in str(link) for s in _TORCH_WRITE_FAILURE) for link in chain):
        low = [
            (path, free) for path in write_paths for free in [free_bytes(path)] if free is not None and free < 64 << 20
        ]
        if low:
            where = ", ".join(f"{path} ({free // 1024} KiB free)" for path, free in low)
            return EXIT_IO, [
                f"error: no space left on device: writing a file failed on {where} ({clean_message(error)})"
            ]
        return EXIT_IO, [
            f"error: writing a file failed: {clean_message(error)}; check free space and permissions"
            + (f" of {', '.join(write_paths)}" if write_paths else "")
        ]
    kind = exit_status_of(error)
    if kind is not None:
        return kind, [f"error: {line}" for line in clean_message(error).splitlines()[:1]] + [
            f"  {line}" for line in clean_message(error).splitlines()[1:]
        ]
    if isinstance(error, OSError):
        return EXIT_IO, [f"error: {_os_error_line(error)}"]
    if isinstance(error, MemoryError):
        return EXIT_IO, ["error: out of memory (lower data.batch_size or the model size)"]
    return None


def report(
    error: BaseException, *, debug: bool = False, speaks: bool = True, write_paths: Sequence[str] = (), stream=None
) -> int:
    """Print `error` as the user should see it and return the exit status."""
    stream = stream or sys.stderr
    if isinstance(error, KeyboardInterrupt):
        if speaks:
            print("interrupted", file=stream, flush=True)
        return EXIT_INTERRUPTED
    described = describe(error, write_paths)
    if described is None:
        if speaks:
            traceback.print_exception(type(error), error, error.__traceback__, file=stream)
            print(
                f"internal error (a bug in dalle2-decoder, please report it with the traceback above): "
                f"{type(error).__name__}: {clean_message(error)}",
                file=stream,
                flush=True,
            )
        return EXIT_BUG
    code, lines = described
    if speaks:
        if debug:
            traceback.print_exception(type(error), error, error.__traceback__, file=stream)
        for line in lines:
            print(line, file=stream)
        stream.flush()
    return code


def guarded(
    body: Callable[[], int],
    *,
    debug: bool = False,
    speaks: bool = True,
    write_paths: Callable[[], Sequence[str]] = lambda: (),
) -> int:
    """Run a command's body; any exception becomes its one-line report and exit status (see module doc)."""
    try:
        return body()
    except SystemExit:
        raise
    except BaseException as error:  # noqa: B902 - KeyboardInterrupt too: reported as "interrupted"
        try:
            paths = list(write_paths())
        except Exception:
            paths = []
        return report(error, debug=debug, speaks=speaks, write_paths=paths)
