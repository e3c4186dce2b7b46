"""Where shards and embedding files live: URL formatting, listing, opening.

Shards are read as streams: local paths, `file://` and `pipe:` commands through webdataset's
`gopen`; every other scheme (http(s), s3, gcs, ...) through fsspec, which also lists embedding
folders and shard prefixes. s3 endpoints and credentials come from the usual environment
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), as for the aws command line.
"""

from __future__ import annotations

import glob
import io
import json
import os
import posixpath
import re
from typing import IO, Dict, List, Optional, Tuple
from urllib.parse import urlparse

import fsspec
import numpy as np
from webdataset.gopen import gopen

END_SHARD_UNSET = 9999999
"""The reference default of `end_shard`: "up to the last shard that exists"."""

_EMBEDDING_NAME = re.compile(r"_(\d+)\.npy$")


def url_kind(url: str) -> str:
    """'pipe', 'local' (plain path or file://) or 'remote' (any other fsspec protocol)."""
    if url.startswith("pipe:"):
        return "pipe"
    scheme = urlparse(url).scheme
    if scheme in ("", "file") or len(scheme) == 1:  # len 1: a Windows drive letter
        return "local"
    return "remote"


def local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file://") else url


def check_base_url(base_url: str) -> None:
    if base_url.count("{}") != 1:
        raise ValueError(
            f"data.webdataset_base_url must contain '{{}}' exactly once, where the shard number goes; got {base_url!r}"
        )


def shard_url(base_url: str, number: int, width: int) -> str:
    """The URL of shard `number`: `{}` in the base URL replaced by the number zero-padded to `width`."""
    return base_url.replace("{}", f"{number:0{width}d}")


def _http(url: str) -> bool:
    return urlparse(url).scheme in ("http", "https")


def open_stream(url: str) -> IO[bytes]:
    """A readable binary stream of a shard or file, read front to back."""
    kind = url_kind(url)
    if kind == "pipe":
        return gopen(url, "rb")
    if kind == "local":
        return open(local_path(url), "rb", buffering=1 << 20)
    fs, path = fsspec.core.url_to_fs(url)
    # block_size=0 streams http without range requests (plain servers do not support them).
    return fs.open(path, "rb", block_size=0 if _http(url) else 1 << 22)


def read_bytes(url: str) -> bytes:
    with open_stream(url) as stream:
        return stream.read()


def list_shard_numbers(base_url: str, width: int) -> Optional[List[int]]:
    """Shard numbers that exist for a base URL, or None when the source cannot be listed (pipe:, http)."""
    kind = url_kind(base_url)
    if kind == "pipe" or _http(base_url):
        return None
    pattern = base_url.replace("{}", "[0-9]" * width)
    regex = re.compile(re.escape(base_url.split("{}")[1]) + "$")
    if kind == "local":
        names = glob.glob(local_path(pattern))
        prefix_len = len(local_path(base_url).split("{}")[0])
    else:
        fs, path_pattern = fsspec.core.url_to_fs(pattern)
        names = fs.glob(path_pattern)
        # The path as the filesystem names it (no protocol); the "x" keeps a trailing "/" from being stripped.
        _, prefix = fsspec.core.url_to_fs(base_url.split("{}")[0] + "x")
        prefix_len = len(prefix) - 1
    numbers = []
    for name in names:
        digits = name[prefix_len : prefix_len + width]
        if digits.isdigit() and regex.match(name[prefix_len + width :]):
            numbers.append(int(digits))
    return sorted(numbers)


def list_embedding_files(folder_url: str) -> Dict[int, str]:
    """Shard number -> URL of each `*_<number>.npy` file in an embedding folder (any fsspec URL)."""
    fs, _, (root,) = fsspec.core.get_fs_token_paths(folder_url)
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"embedding folder {folder_url!r} does not exist") from error
    found = {}
    protocol = urlparse(folder_url).scheme
    for entry in entries:
        name = posixpath.basename(entry.rstrip("/"))
        match = _EMBEDDING_NAME.search(name)
        if not match:
            continue
        if _http(folder_url):
            url = entry  # http listings are already full URLs
        elif protocol and protocol != "file":
            url = f"{protocol}://{entry}"
        else:
            url = entry
        found[int(match.group(1))] = url
    return found


def load_npy(url: str) -> np.ndarray:
    """A whole .npy file; local files are memory-mapped so only the rows used are read."""
    if url_kind(url) == "local":
        return np.load(local_path(url), mmap_mode="r", allow_pickle=False)
    return np.load(io.BytesIO(read_bytes(url)), allow_pickle=False)


def npy_shape(url: str) -> Tuple[int, ...]:
    """The array shape from a .npy header, reading only the first bytes of the file."""
    with open_stream(url) as stream:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(stream)
    return tuple(shape)


SIZES_FILE = "sizes.json"


def sizes_file_url(base_url: str) -> Optional[str]:
    """Where `sizes.json` would be for a base URL (beside the shards), or None (pipe:, `{}` in a folder)."""
    if url_kind(base_url) == "pipe":
        return None
    folder = base_url.rsplit("/", 1)[0] if "/" in base_url else "."
    if "{}" in folder:
        return None
    return folder + "/" + SIZES_FILE


def read_sizes_file(base_url: str) -> Tuple[Optional[str], Dict[str, Tuple[int, Optional[int]]]]:
    """(its URL, {shard file name: (samples, bytes or None)}) from `sizes.json` beside the shards.

    The prepare and demo commands write this file; it saves reading every shard at start to count
    its samples. Its format: `{"000000.tar": {"samples": 1000, "bytes": 10240000}, ...}`; the byte
    size lets a reader check cheaply that the count belongs to the shard as it is now. The older
    `{"000000.tar": 1000}` (no byte size) is read too. (None, {}) when there is no usable file.
    """
    url = sizes_file_url(base_url)
    if url is None:
        return None, {}
    try:
        raw = json.loads(read_bytes(url))
    except (FileNotFoundError, OSError, ValueError):
        return None, {}
    entries: Dict[str, Tuple[int, Optional[int]]] = {}
    if not isinstance(raw, dict):
        return url, entries
    for name, value in raw.items():
        try:
            if isinstance(value, dict):
                entries[str(name)] = (
                    int(value["samples"]),
                    int(value["bytes"]) if value.get("bytes") is not None else None,
                )
            else:
                entries[str(name)] = (int(value), None)
        except (KeyError, TypeError, ValueError):
            continue  # an entry that cannot be read: that shard is counted instead
    return url, entries


def byte_size(url: str) -> Optional[int]:
    """The size of a shard file in bytes (a stat, or an fsspec info request); None where unknown."""
    kind = url_kind(url)
    try:
        if kind == "local":
            return os.path.getsize(local_path(url))
        if kind == "remote":
            fs, path = fsspec.core.url_to_fs(url)
            size = fs.size(path)
            return int(size) if size is not None else None
    except Exception:
        return None
    return None


def npy_problem(error: BaseException) -> str:
    """What is wrong with a .npy file, in words (numpy's own messages suggest allow_pickle, which
    would unpickle arbitrary objects, and name no file)."""
    text = str(error)
    if "allow_pickle" in text or "Object arrays" in text:
        return "it holds Python objects (a pickled object array), not numbers; write it with np.save of a float array"
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if "magic" in text.lower() or "header" in text.lower() or isinstance(error, (EOFError, ValueError)):
        return f"not a valid .npy file ({text.splitlines()[0] if text else type(error).__name__})"
    return text.splitlines()[0] if text else type(error).__name__


def shard_file_name(url: str) -> str:
    return posixpath.basename(url)


def exists_locally(url: str) -> bool:
    return os.path.exists(local_path(url))
