"""Writing files so that a crash, a kill or a full disk never leaves a half-written one."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable, Optional, Union

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


def existing_ancestor(path: PathLike) -> str:
    """`path` made absolute, or its nearest folder above that exists (the filesystem root at worst)."""
    current = os.path.abspath(os.path.expanduser(os.fspath(path)))
    while not os.path.exists(current) and os.path.dirname(current) != current:
        current = os.path.dirname(current)
    return current


def unwritable_folder_reason(path: PathLike) -> Optional[str]:
    """None when files can be created in the folder `path` (created if missing); else why not.

    Tries a real write (a small probe file, removed again) in the nearest existing folder, since
    permissions, read-only mounts and quotas are only known by trying.
    """
    target = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(target) and not os.path.isdir(target):
        return f"{target} exists and is not a folder"
    folder = existing_ancestor(target)
    if not os.path.isdir(folder):
        return f"{folder} is a file, so {target} cannot be created"
    probe = os.path.join(folder, f".dalle2-write-test-{uuid.uuid4().hex[:8]}")
    try:
        with open(probe, "wb") as handle:
            handle.write(b"x")
    except OSError as error:
        reason = error.strerror or str(error)
        shown = target if folder == target else f"{target} (its folder {folder})"
        return f"{shown} is not writable: {reason}"
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
    return None
