"""Writing a webdataset plus per-shard embedding files, laid out the way the loader reads them.

Layout under `out_dir`:
    shards/000000.tar ...          samples keyed <shard><index>: .jpg, .txt (and .img_emb.npy /
                                   .text_emb.npy members when embeddings go in the shards)
    shards/sizes.json              samples and bytes per shard file ({"000000.tar": {"samples": 1000,
                                   "bytes": ...}}), so loaders need not count; the byte size shows
                                   when an entry no longer belongs to the shard
    img_emb/img_emb_000000.npy     row i = embedding of the sample with index i (clip-retrieval layout)
    text_emb/text_emb_000000.npy
"""

from __future__ import annotations

import io
import json
import os
from typing import Dict, List, Optional

import numpy as np
from webdataset import TarWriter


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ShardSetWriter:
    """Add samples one by one; shards roll over every `shard_size` samples. Use as a context manager."""

    def __init__(
        self,
        out_dir: str,
        *,
        shard_size: int = 1000,
        shard_width: int = 6,
        index_width: int = 4,
        embeddings_in_shards: bool = False,
        embedding_files: Optional[bool] = None,
    ):
        """`embeddings_in_shards`: embeddings as .npy members of each sample; `embedding_files`: as
        per-shard .npy files beside the shards (default: exactly when they are not in the shards)."""
        if shard_size > 10**index_width:
            raise ValueError(f"shard_size {shard_size} does not fit index_width {index_width}")
        self.out_dir = out_dir
        self.shard_size = shard_size
        self.shard_width = shard_width
        self.index_width = index_width
        self.embeddings_in_shards = embeddings_in_shards
        self.embedding_files = not embeddings_in_shards if embedding_files is None else embedding_files
        self.shard_dir = os.path.join(out_dir, "shards")
        os.makedirs(self.shard_dir, exist_ok=True)
        self.sizes: Dict[str, int] = {}
        self.byte_sizes: Dict[str, int] = {}
        self._shard = -1
        self._index = 0
        self._tar: Optional[TarWriter] = None
        self._rows: Dict[str, List[np.ndarray]] = {}

    @property
    def base_url(self) -> str:
        """`data.webdataset_base_url` for what this writer writes."""
        return os.path.join(os.path.abspath(self.shard_dir), "{}.tar")

    def embeddings_url(self, name: str) -> str:
        return os.path.join(os.path.abspath(self.out_dir), name)

    def _shard_name(self, number: int) -> str:
        return f"{number:0{self.shard_width}d}"

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = self._shard_name(self._shard) + ".tar"
        self.sizes[name] = self._index
        self.byte_sizes[name] = os.path.getsize(os.path.join(self.shard_dir, name))
        if self.embedding_files:
            for name, rows in self._rows.items():
                folder = os.path.join(self.out_dir, name)
                os.makedirs(folder, exist_ok=True)
                np.save(os.path.join(folder, f"{name}_{self._shard_name(self._shard)}.npy"), np.stack(rows))
        self._tar, self._rows = None, {}

    def add(
        self,
        image_bytes: bytes,
        *,
        caption: Optional[str] = None,
        image_ext: str = "jpg",
        image_embed: Optional[np.ndarray] = None,
        text_embed: Optional[np.ndarray] = None,
    ) -> str:
        """Write one sample; returns its key."""
        if self._tar is None or self._index >= self.shard_size:
            self._finish_shard()
            self._shard += 1
            self._index = 0
            self._tar = TarWriter(os.path.join(self.shard_dir, self._shard_name(self._shard) + ".tar"))
        key = self._shard_name(self._shard) + f"{self._index:0{self.index_width}d}"
        sample = {"__key__": key, image_ext: image_bytes}
        if caption is not None:
            sample["txt"] = caption.encode("utf-8")
        for name, vector in (("img_emb", image_embed), ("text_emb", text_embed)):
            if vector is None:
                continue
            vector = np.asarray(vector, dtype=np.float32)
            if self.embeddings_in_shards:
                sample[f"{name}.npy"] = npy_bytes(vector)
            self._rows.setdefault(name, []).append(vector)
        self._tar.write(sample)
        self._index += 1
        return key

    def close(self) -> None:
        self._finish_shard()
        with open(os.path.join(self.shard_dir, "sizes.json"), "w") as file:
            json.dump(
                {name: {"samples": count, "bytes": self.byte_sizes[name]} for name, count in self.sizes.items()},
                file,
                indent=1,
            )

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
