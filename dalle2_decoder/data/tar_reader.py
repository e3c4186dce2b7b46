"""Reading samples out of a webdataset tar: members grouped by key, in archive order.

Our own loop rather than webdataset's `tar_file_iterator`, because the loader needs to know
exactly which samples a truncated archive delivered: a sample is yielded only once all of its
members were read, and an error names the point where the archive broke. Plain archives are
parsed by hand (a 512-byte header per member); `tarfile` reads compressed ones.
Keys and extensions follow webdataset's rule (`base_plus_ext`: key up to the first dot of the
file name), so shards written by webdataset's `TarWriter` read the same way.
"""

from __future__ import annotations

import os
import tarfile
from typing import IO, ClassVar, Dict, Iterator, Optional

from webdataset.tariterators import base_plus_ext

from ..failures import EXIT_DATA


class ShardReadError(Exception):
    """A shard could not be opened, or its archive broke off (truncated, corrupt header).

    `not_a_tar` is True when the file is no tar archive at all (empty, or its first block is not a
    tar header): nothing was cut off, the wrong file is there.
    """

    exit_status: ClassVar[int] = EXIT_DATA

    def __init__(self, message: str, *, not_a_tar: bool = False):
        super().__init__(message)
        self.not_a_tar = not_a_tar


def _member_key(name: str) -> Optional[tuple]:
    """(key, lower-case extension) of a member name, or None for members that are not sample data."""
    base = os.path.basename(name)
    if base.startswith("__") and base.endswith("__"):
        return None  # webdataset metadata members
    prefix, suffix = base_plus_ext(name)
    if prefix is None:
        return None
    return prefix, suffix.lower()


def iter_tar_samples(stream: IO[bytes]) -> Iterator[Dict[str, bytes]]:
    """Samples (`{"__key__": key, ext: bytes, ...}`) of a tar stream; raises ShardReadError if it breaks.

    The sample being read when the archive breaks is not yielded: its members may be incomplete.
    Plain archives are parsed here (`_iter_members`: about 8x less Python work per member than
    `tarfile`, which costs as much as decoding a small JPEG); compressed ones go through `tarfile`.
    """
    current: Optional[Dict[str, bytes]] = None
    try:
        head = _read(stream, BLOCK, None)
        # (a plain archive whose first member is named like a magic number is still plain)
        compressed = head.startswith(COMPRESSED_MAGIC) and not (len(head) == BLOCK and _checksum_ok(head))
        members = _iter_tarfile_members(_Prefixed(head, stream)) if compressed else _iter_members(head, stream)
        for name, data in members:
            parsed = _member_key(name)
            if parsed is None:
                continue
            key, extension = parsed
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[extension] = data
    except _BrokenArchive as broken:
        # The sample being read is whole only if the archive broke inside a member of the next
        # one; a break in a header could have hidden more of its members.
        broken_key = (_member_key(broken.member) or (None,))[0] if broken.member is not None else None
        broken_at = info_name(current)
        if current is not None and broken_key is not None and broken_key != current["__key__"]:
            yield current
            broken_at = f"sample {broken_key!r}"
        if broken.not_a_tar:
            raise ShardReadError(f"not a tar archive: {broken.reason}", not_a_tar=True) from broken.__cause__
        raise ShardReadError(f"archive broke off at {broken_at}: {broken.reason}") from broken.__cause__
    if current is not None:
        yield current


BLOCK = 512
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz
_REGULAR = (b"0", b"\x00", b"7")


class _BrokenArchive(Exception):
    """Where an archive broke: inside the data of `member`, or (None) between members."""

    def __init__(self, reason: str, member: Optional[str], not_a_tar: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.member = member
        self.not_a_tar = not_a_tar


def _read(stream: IO[bytes], size: int, member: Optional[str]) -> bytes:
    try:
        return _read_exactly(stream, size)
    except OSError as error:  # a network or pipe error: the archive breaks off here
        raise _BrokenArchive(str(error), member) from error


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    """`size` bytes, or fewer only at the end of the stream (pipes and sockets may return less per read)."""
    data = stream.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    missing = size - len(data)
    while missing:
        more = stream.read(missing)
        if not more:
            break
        parts.append(more)
        missing -= len(more)
    return b"".join(parts)


def _header_number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for values that do not fit in octal
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else value
    text = field.split(b"\x00", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = _header_number(block[148:156])
    except ValueError:
        return False
    unsigned = sum(block[:148]) + sum(block[156:]) + 8 * 32  # the checksum field counts as spaces
    if stored == unsigned:
        return True
    signed = unsigned - sum(256 for byte in block[:148] + block[156:] if byte > 127)
    return stored == signed


def _pax_records(data: bytes) -> Dict[str, str]:
    """`"<length> <key>=<value>\\n"` records of a pax extended header."""
    records = {}
    position = 0
    while position < len(data):
        space = data.index(b" ", position)
        length = int(data[position:space])
        if length <= 0:
            raise ValueError("bad pax record length")
        key, _, value = data[space + 1 : position + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def _iter_members(head: bytes, stream: IO[bytes]) -> Iterator[tuple]:
    """(name, data) of each regular member of a plain (ustar, pax or GNU) tar stream.

    Raises _BrokenArchive where the archive breaks off or a header is corrupt. Like `tarfile`,
    an archive that ends at a header boundary without its end-of-archive blocks is complete.
    """
    block = head
    long_name: Optional[str] = None
    pax: Dict[str, str] = {}
    first = True
    while True:
        if not block:
            if first:
                raise _BrokenArchive("the file is empty", None, not_a_tar=True)
            if long_name is not None or pax:
                raise _BrokenArchive("the archive ends after an extended header", None)
            return
        if len(block) < BLOCK:
            if first:
                raise _BrokenArchive(
                    f"the file is {len(block)} bytes, shorter than one tar header", None, not_a_tar=True
                )
            raise _BrokenArchive("unexpected end of data in a member header", None)
        if block.count(0) == BLOCK:
            return  # end-of-archive marker
        if not _checksum_ok(block):
            if first:
                raise _BrokenArchive(
                    "its first 512 bytes are not a tar header (wrong file, or another format)", None, not_a_tar=True
                )
            raise _BrokenArchive("bad checksum in a member header", None)
        first = False
        try:
            size = _header_number(block[124:136])
        except ValueError:
            raise _BrokenArchive("unreadable size in a member header", None) from None
        kind = block[156:157]
        name = block[:100].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
        if block[257:263] == b"ustar\x00":  # POSIX ustar: long names are split into prefix / name
            prefix = block[345:500].split(b"\x00", 1)[0]
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        if kind in (b"x", b"g", b"L", b"K"):
            data = _read(stream, size + (-size) % BLOCK, None)
            if len(data) < size + (-size) % BLOCK:
                raise _BrokenArchive("unexpected end of data in an extended header", None)
            data = data[:size]
            if kind == b"x":
                try:
                    pax = _pax_records(data)
                except (ValueError, IndexError):
                    raise _BrokenArchive("corrupt pax extended header", None) from None
            elif kind == b"L":
                long_name = data.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
            block = _read(stream, BLOCK, None)
            continue
        if long_name is not None:
            name, long_name = long_name, None
        if pax:
            name = pax.get("path", name)
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    raise _BrokenArchive("unreadable size in a pax header", None) from None
            pax = {}
        data = _read(stream, size, name)
        if len(data) < size:
            raise _BrokenArchive(f"member {name} is cut short", name)
        padding = (-size) % BLOCK
        following = _read(stream, padding + BLOCK, None)  # the padding and the next header in one read
        if kind in _REGULAR:
            yield name, data
        if len(following) < padding:
            raise _BrokenArchive(f"the archive ends inside the padding after member {name}", None)
        block = following[padding:]


def _iter_tarfile_members(stream: IO[bytes]) -> Iterator[tuple]:
    """(name, data) of each regular member, through `tarfile` (compressed archives)."""
    member = None
    try:
        # names in UTF-8, as our own parser reads them (tarfile's default follows the locale)
        archive = tarfile.open(fileobj=stream, mode="r|*", encoding="utf-8")
        for info in archive:
            if not info.isreg():
                continue
            member = info.name
            data = archive.extractfile(info).read()
            if len(data) != info.size:
                raise tarfile.ReadError(f"member {info.name} is cut short")
            member = None
            archive.members = []  # streaming: do not keep every header in memory
            yield info.name, data
    except (tarfile.TarError, OSError, EOFError) as error:
        raise _BrokenArchive(str(error), member) from error


class _Prefixed:
    """A read-only stream of `head` followed by the rest of `stream` (for a sniffed first block)."""

    def __init__(self, head: bytes, stream: IO[bytes]):
        self._head = head
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(size)
        if size is None or size < 0:
            data, self._head = self._head + self._stream.read(), b""
            return data
        data, self._head = self._head[:size], self._head[size:]
        if len(data) < size:
            data += self._stream.read(size - len(data))
        return data


def not_a_tar_reason(path: str) -> Optional[str]:
    """Why the local file at `path` is not a tar archive (reading its first block only), or None."""
    with open(path, "rb") as handle:
        head = handle.read(BLOCK)
    if not head:
        return "the file is empty"
    if head.startswith(COMPRESSED_MAGIC):
        return None
    if len(head) < BLOCK:
        return f"the file is {len(head)} bytes, shorter than one tar header"
    if head.count(0) == BLOCK or _checksum_ok(head):
        return None
    return "its first 512 bytes are not a tar header (wrong file, or another format)"


def info_name(sample: Optional[Dict[str, bytes]]) -> str:
    return f"sample {sample['__key__']!r}" if sample else "its start"


def count_local_tar_samples(path: str) -> int:
    """Samples of a local tar that `iter_tar_samples` would yield, reading only the member headers."""
    size = os.path.getsize(path)
    count = 0
    current_key = None
    try:
        archive = tarfile.open(path, mode="r:", encoding="utf-8")
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
            parsed = _member_key(info.name) if info.isreg() else None
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
