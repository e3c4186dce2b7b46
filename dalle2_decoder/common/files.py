"""Writing files so that a crash, a kill or a full disk never leaves a half-written one."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(temp_path)` on a temporary file beside `path`, then rename it over `path`.

    A reader sees the old file or the new one, never a partial write: the data reaches the disk
    (fsync) before the rename makes it visible, and the rename itself is made durable by syncing
    the folder. A failed write leaves the old file untouched and removes the temporary one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temp)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_folder(target.parent)
    return target


def atomic_write_text(path: PathLike, text: str) -> Path:
    """`atomic_write` of a text file (UTF-8)."""
    return atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """`atomic_write` of a binary file."""
    return atomic_write(path, lambda temp: temp.write_bytes(data))


def fsync_folder(folder: PathLike) -> None:
    """Make a rename inside `folder` durable (not possible on every platform or filesystem: then skipped)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
