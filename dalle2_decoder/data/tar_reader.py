"""Reading samples out of a webdataset tar: members grouped by key, in archive order.

A small loop over `tarfile` rather than webdataset's `tar_file_iterator`, because the loader
needs to know exactly which samples a truncated archive delivered: a sample is yielded only
once all of its members were read, and an error names the point where the archive broke.
Keys and extensions follow webdataset's rule (`base_plus_ext`: key up to the first dot of the
file name), so shards written by webdataset's `TarWriter` read the same way.
"""
from __future__ import annotations

import os
import tarfile
from typing import IO, Dict, Iterator, Optional

from webdataset.tariterators import base_plus_ext


class ShardReadError(Exception):
    """A shard could not be opened, or its archive broke off (truncated, corrupt header)."""


def _member_key(info: tarfile.TarInfo) -> Optional[tuple]:
    if not info.isreg():
        return None
    name = info.name
    base = os.path.basename(name)
    if base.startswith("__") and base.endswith("__"):
        return None  # webdataset metadata members
    prefix, suffix = base_plus_ext(name)
    if prefix is None:
        return None
    return prefix, suffix.lower()


def iter_tar_samples(stream: IO[bytes]) -> Iterator[Dict[str, bytes]]:
    """Samples (`{"__key__": key, ext: bytes, ...}`) of a tar stream; raises ShardReadError if it breaks.

    The sample being read when the archive breaks is not yielded: its members are incomplete.
    """
    current: Optional[Dict[str, bytes]] = None
    reading_member = False
    try:
        archive = tarfile.open(fileobj=stream, mode="r|*")
        for info in archive:
            parsed = _member_key(info)
            if parsed is None:
                continue
            key, extension = parsed
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            reading_member = True
            data = archive.extractfile(info).read()
            if len(data) != info.size:
                raise tarfile.ReadError(f"member {info.name} is cut short")
            reading_member = False
            current[extension] = data
            archive.members = []  # streaming: do not keep every header in memory
    except (tarfile.TarError, OSError, EOFError) as error:
        broken_at = info_name(current)
        if current is not None and not reading_member:
            yield current  # the archive broke between members: the last sample is whole
        raise ShardReadError(f"archive broke off at {broken_at}: {error}") from error
    if current is not None:
        yield current


def info_name(sample: Optional[Dict[str, bytes]]) -> str:
    return f"sample {sample['__key__']!r}" if sample else "its start"


def count_local_tar_samples(path: str) -> int:
    """Samples of a local tar that `iter_tar_samples` would yield, reading only the member headers."""
    size = os.path.getsize(path)
    count = 0
    current_key = None
    try:
        archive = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError, EOFError):
        return 0
    with archive:
        while True:
            try:
                info = archive.next()
            except (tarfile.TarError, OSError, EOFError):
                break
            if info is None:
                break
            parsed = _member_key(info)
            if parsed is None:
                continue
            if info.offset_data + info.size > size:
                # This member is cut short: its sample is incomplete and nothing after it is read.
                if current_key == parsed[0]:
                    count -= 1
                break
            if parsed[0] != current_key:
                current_key = parsed[0]
                count += 1
    return count


def count_stream_samples(stream: IO[bytes]) -> int:
    """Samples of a tar read as a stream (remote or pipe: shards), up to where it breaks."""
    count = 0
    try:
        for _ in iter_tar_samples(stream):
            count += 1
    except ShardReadError:
        pass
    return count
