"""Shards and embedding files written by the data tests themselves (plain tarfile + numpy, so the
test data does not depend on the package's own writer)."""

from __future__ import annotations

import functools
import io
import os
import tarfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image


@functools.lru_cache(maxsize=None)
def jpeg_bytes(shade: int, size: int = 8) -> bytes:
    image = Image.new("RGB", (size, size), (shade % 256, (shade * 7) % 256, (shade * 13) % 256))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array))
    return buffer.getvalue()


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@dataclass
class WrittenDataset:
    root: str
    base_url: str
    img_embeddings_url: Optional[str]
    text_embeddings_url: Optional[str]
    shard_numbers: List[int]
    keys_by_shard: Dict[int, List[str]] = field(default_factory=dict)
    image_embeds: Dict[str, np.ndarray] = field(default_factory=dict)
    text_embeds: Dict[str, np.ndarray] = field(default_factory=dict)
    captions: Dict[str, str] = field(default_factory=dict)

    @property
    def keys(self) -> List[str]:
        return [key for number in self.shard_numbers for key in self.keys_by_shard[number]]

    def shard_path(self, number: int, width: int) -> str:
        return self.base_url.replace("{}", f"{number:0{width}d}")


def write_dataset(
    root: str,
    sizes: Sequence[int],
    *,
    shard_width: int = 6,
    index_width: int = 4,
    dim: int = 8,
    embeddings: str = "folder",  # "folder", "shard" or "none"
    text: bool = False,
    start_shard: int = 0,
    embedding_file_width: int = 5,
    overrides: Optional[Dict[str, Dict[str, Optional[bytes]]]] = None,
    zero_rows: Sequence[str] = (),
    seed: int = 0,
) -> WrittenDataset:
    """`len(sizes)` shards numbered from `start_shard`; shard k holds sizes[k] samples.

    `overrides[key][member]` replaces a member's bytes (None removes the member); `zero_rows` keys get
    an all-zero row in the embedding files. Embedding files are named like clip-retrieval's, with
    their own zero padding (`embedding_file_width`), to check the loader matches by number.
    """
    rng = np.random.default_rng(seed)
    overrides = overrides or {}
    shard_dir = os.path.join(root, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    img_dir = os.path.join(root, "img_emb") if embeddings == "folder" else None
    text_dir = os.path.join(root, "text_emb") if embeddings == "folder" and text else None
    for folder in (img_dir, text_dir):
        if folder:
            os.makedirs(folder, exist_ok=True)
    dataset = WrittenDataset(root, os.path.join(shard_dir, "{}.tar"), img_dir, text_dir, [])
    for offset, size in enumerate(sizes):
        number = start_shard + offset
        dataset.shard_numbers.append(number)
        keys, img_rows, text_rows = [], [], []
        with tarfile.open(os.path.join(shard_dir, f"{number:0{shard_width}d}.tar"), "w") as archive:
            for index in range(size):
                key = f"{number:0{shard_width}d}{index:0{index_width}d}"
                img_vec = rng.standard_normal(dim).astype(np.float32)
                text_vec = rng.standard_normal(dim).astype(np.float32)
                if key in zero_rows:
                    img_vec = np.zeros(dim, np.float32)
                members = {"jpg": jpeg_bytes(number * 31 + index), "txt": f"caption of {key}".encode()}
                if embeddings == "shard":
                    members["img_emb.npy"] = npy_bytes(img_vec)
                    if text:
                        members["text_emb.npy"] = npy_bytes(text_vec)
                for member, data in overrides.get(key, {}).items():
                    if data is None:
                        members.pop(member, None)
                    else:
                        members[member] = data
                for member, data in members.items():
                    add_member(archive, f"{key}.{member}", data)
                keys.append(key)
                img_rows.append(img_vec)
                text_rows.append(text_vec)
                dataset.image_embeds[key] = img_vec
                dataset.text_embeds[key] = text_vec
                dataset.captions[key] = f"caption of {key}"
        dataset.keys_by_shard[number] = keys
        if img_dir:
            np.save(os.path.join(img_dir, f"img_emb_{number:0{embedding_file_width}d}.npy"), np.stack(img_rows))
        if text_dir:
            np.save(os.path.join(text_dir, f"text_emb_{number:0{embedding_file_width}d}.npy"), np.stack(text_rows))
    return dataset


def data_config(dataset: WrittenDataset, **overrides):
    """A DataConfig reading `dataset` entirely as training data, unshuffled, unless overridden."""
    from dalle2_decoder.config import DataConfig, DataSplits

    options = dict(
        webdataset_base_url=dataset.base_url,
        img_embeddings_url=dataset.img_embeddings_url,
        text_embeddings_url=dataset.text_embeddings_url,
        num_workers=0,
        batch_size=4,
        splits=DataSplits(train=1.0, val=0.0, test=0.0),
        shuffle_train=False,
    )
    options.update(overrides)
    return DataConfig(**options)


def read_all(loader) -> List[dict]:
    return list(loader)


def keys_of(batches) -> List[str]:
    return [key for batch in batches for key in batch["key"]]


def truncate_inside(path: str, key: str) -> None:
    """Cut a tar off in the middle of sample `key`'s image: samples before it stay whole."""
    with tarfile.open(path) as archive:
        member = archive.getmember(f"{key}.jpg")
    with open(path, "r+b") as file:
        file.truncate(member.offset_data + member.size // 2)
