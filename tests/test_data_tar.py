"""The tar reader: our own parser of plain archives must read exactly what `tarfile` reads, in
every format tarfile writes, and report a broken archive instead of reading past it."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile

import pytest

from dalle2_decoder.data.tar_reader import ShardReadError, iter_tar_samples

from .conftest import REPO_ROOT


def archive_bytes(members, format=tarfile.PAX_FORMAT, mtime=1.5) -> bytes:
    buffer = io.BytesIO()
    # names in UTF-8, as webdataset writes them (tarfile's default follows the locale)
    with tarfile.open(fileobj=buffer, mode="w", format=format, encoding="utf-8") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = mtime
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def samples_via_tarfile(data: bytes):
    """What the samples are, read with the standard library (the reference for the parser)."""
    samples, current = [], None
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8") as archive:
        for info in archive:
            if not info.isreg():
                continue
            base = info.name.rsplit("/", 1)[-1]
            key = info.name[: len(info.name) - len(base)] + base.split(".", 1)[0]
            if current is None or current["__key__"] != key:
                current = {"__key__": key}
                samples.append(current)
            current[base.split(".", 1)[1]] = archive.extractfile(info).read()
    return samples


def read_all(data: bytes, chunk: int = 0):
    stream = io.BytesIO(data) if not chunk else TrickleStream(data, chunk)
    return list(iter_tar_samples(stream))


class TrickleStream(io.RawIOBase):
    """A stream that returns at most `chunk` bytes per read, like a pipe or a socket."""

    def __init__(self, data: bytes, chunk: int):
        self._data, self._chunk, self._position = data, chunk, 0

    def readable(self):
        return True

    def read(self, size=-1):
        size = self._chunk if size is None or size < 0 else min(size, self._chunk)
        piece = self._data[self._position : self._position + size]
        self._position += len(piece)
        return piece


MEMBERS = [
    ("000001.jpg", b"\xff\xd8" + bytes(range(256)) * 3),
    ("000001.txt", "a caption with ünïcödé".encode()),
    ("000001.img_emb.npy", b"x" * 512),  # exactly one block: no padding
    ("000002.jpg", b""),  # empty member
    ("000002.txt", b"second"),
    ("dir/with/a/" + "long_" * 30 + "000003.jpg", b"long name" * 100),  # over 100 characters
    ("dir/with/a/" + "long_" * 30 + "000003.txt", b"its caption"),
    ("ünï/000004.jpg", b"non-ascii path"),
]


@pytest.mark.parametrize("format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_the_parser_reads_what_tarfile_reads_in_every_format(format):
    members = (
        MEMBERS if format != tarfile.USTAR_FORMAT else [m for m in MEMBERS if "long_" not in m[0] and m[0].isascii()]
    )
    data = archive_bytes(members, format=format, mtime=1 if format == tarfile.USTAR_FORMAT else 1.5)
    expected = samples_via_tarfile(data)
    assert len(expected) == len({name.rsplit(".", 1)[0].split(".")[0] for name, _ in members})
    assert read_all(data) == expected
    assert read_all(data, chunk=100) == expected  # short reads (pipes, sockets) change nothing


def test_sizes_beyond_the_octal_field_and_base256_numbers_are_read():
    # GNU writes base-256 numbers where octal does not fit; pax writes them as a record.
    # Small stand-ins: a pax size record that overrides the header, and a base-256 mtime.
    info = tarfile.TarInfo("000001.jpg")
    info.size = 5
    info.mtime = 8**11 + 1  # does not fit the 11 octal digits: GNU writes base-256
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        archive.addfile(info, io.BytesIO(b"12345"))
    assert read_all(buffer.getvalue()) == [{"__key__": "000001", "jpg": b"12345"}]


def test_compressed_archives_are_read_through_tarfile():
    data = archive_bytes(MEMBERS[:5])
    assert read_all(gzip.compress(data)) == samples_via_tarfile(data)
    # A plain archive whose first name starts like bzip2's magic number is still plain.
    data = archive_bytes([("BZh91.jpg", b"image"), ("BZh91.txt", b"caption")], format=tarfile.USTAR_FORMAT, mtime=1)
    assert read_all(data) == [{"__key__": "BZh91", "jpg": b"image", "txt": b"caption"}]


def test_names_read_as_utf8_whatever_the_locale():
    """Compressed shards go through tarfile, whose names follow the locale by default: under a
    non-UTF-8 one (C, with Python's UTF-8 mode off) a GNU-format gzip shard must still give the keys
    our parser reads from the same archive uncompressed."""
    script = (
        "import gzip, tarfile\n"
        "from tests.test_data_tar import MEMBERS, archive_bytes, read_all\n"
        "data = archive_bytes(MEMBERS, format=tarfile.GNU_FORMAT)\n"
        "plain = [sample['__key__'] for sample in read_all(data)]\n"
        "packed = [sample['__key__'] for sample in read_all(gzip.compress(data))]\n"
        "print(ascii(plain)); print(ascii(packed))\n"
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    plain, packed = result.stdout.splitlines()[-2:]
    assert "\\xfcn\\xef/000004" in plain and packed == plain  # 'ü', 'ï' decoded as UTF-8 in both


def test_a_corrupt_header_is_reported_and_the_sample_it_may_belong_to_is_not_delivered():
    data = bytearray(archive_bytes(MEMBERS[:5]))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as archive:
        second = next(info for info in archive if info.name == "000002.jpg")
    data[second.offset + 10] ^= 0xFF  # a byte of the name field: the checksum no longer matches
    delivered = []
    with pytest.raises(ShardReadError, match="broke off at sample '000001': bad checksum"):
        for sample in iter_tar_samples(io.BytesIO(bytes(data))):
            delivered.append(sample)
    # The broken header could have been one more member of 000001: it is not passed on as whole.
    assert delivered == []


@pytest.mark.parametrize("where", ["member data", "padding", "header", "extended header"])
def test_an_archive_cut_short_anywhere_is_reported(where):
    data = archive_bytes(MEMBERS[:5])
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        infos = {info.name: info for info in archive}
    jpg, txt = infos["000002.jpg"], infos["000002.txt"]  # jpg is empty, so its sample is txt's
    cut = {
        "member data": txt.offset_data + 3,  # inside the second sample's caption
        "padding": txt.offset_data + txt.size + 5,  # the caption is whole, its padding is not
        "header": txt.offset + 200,  # inside the pax header block of the caption
        "extended header": jpg.offset + 512 + 10,  # inside the pax records before the empty jpg
    }[where]
    delivered = []
    with pytest.raises(ShardReadError, match="archive broke off at"):
        for sample in iter_tar_samples(io.BytesIO(data[:cut])):
            delivered.append(sample)
    # Only samples known to be whole: 000001 once a member of 000002 was read (a break in the
    # headers before that could hide more of 000001's members); never the broken 000002.
    expected = [] if where == "extended header" else samples_via_tarfile(data)[:1]
    assert delivered == expected


def test_an_archive_ending_at_a_member_boundary_is_whole():
    data = archive_bytes(MEMBERS[:5])
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        last = [info for info in archive][-1]
    end = last.offset_data + last.size + (-last.size) % 512  # no end-of-archive blocks
    assert read_all(data[:end]) == samples_via_tarfile(data)


def test_an_empty_file_is_an_error():
    with pytest.raises(ShardReadError, match="not a tar archive: the file is empty"):
        read_all(b"")
