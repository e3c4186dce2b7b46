"""The shards a data config names (`plan.configured_shards`, shared by the loaders and preflight) and
the layout `ShardSetWriter` writes by default (embedding files exactly when the shards hold none)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dalle2_decoder.config import DataConfig
from dalle2_decoder.data import plan
from dalle2_decoder.data.writer import ShardSetWriter

try:
    from .data_fixtures import data_config, jpeg_bytes, write_dataset
except ImportError:
    from data_fixtures import data_config, jpeg_bytes, write_dataset


def test_configured_shards_take_the_range_and_embedding_folders_of_the_config(tmp_path):
    dataset = write_dataset(str(tmp_path), [2, 2, 2, 2], text=True)
    os.remove(os.path.join(dataset.img_embeddings_url, "img_emb_00002.npy"))
    config = data_config(dataset, start_shard=1)

    with_files = plan.configured_shards(config)
    # Shard 0 is below data.start_shard; shard 2 lacks its image embedding file, so it is left out.
    assert [shard.number for shard in with_files] == [1, 3]
    for shard in with_files:
        assert os.path.basename(shard.img_embeddings_url) == f"img_emb_{shard.number:05d}.npy"
        assert os.path.basename(shard.text_embeddings_url) == f"text_emb_{shard.number:05d}.npy"

    without = plan.configured_shards(config, embedding_folders=False)
    assert [shard.number for shard in without] == [1, 2, 3]
    assert all(shard.img_embeddings_url is None and shard.text_embeddings_url is None for shard in without)


def test_configured_shards_report_a_missing_shard_as_the_config_asks(tmp_path):
    dataset = write_dataset(str(tmp_path), [1, 1, 1])
    os.remove(dataset.base_url.format("000001"))
    with pytest.raises(plan.DataSetupError, match="missing in 0..2"):
        plan.configured_shards(data_config(dataset))
    kept = plan.configured_shards(data_config(dataset, skip_missing_shards=True), embedding_folders=False)
    assert [shard.number for shard in kept] == [0, 2]


@pytest.mark.parametrize("in_shards", [False, True])
def test_the_writer_writes_embedding_files_exactly_when_the_shards_hold_no_embeddings(tmp_path, in_shards):
    with ShardSetWriter(str(tmp_path), shard_size=2, embeddings_in_shards=in_shards) as writer:
        for index in range(3):
            writer.add(jpeg_bytes(index), caption=f"c{index}", image_embed=np.full(4, index, np.float32))
    folder = tmp_path / "img_emb"
    if in_shards:
        assert not folder.exists()
    else:
        assert sorted(os.listdir(folder)) == ["img_emb_000000.npy", "img_emb_000001.npy"]
        assert np.load(folder / "img_emb_000001.npy").tolist() == [[2.0] * 4]
    # The config that reads it finds each shard's embedding file, or (in the shards) none.
    config = DataConfig(
        webdataset_base_url=writer.base_url,
        img_embeddings_url=None if in_shards else writer.embeddings_url("img_emb"),
    )
    shards = plan.configured_shards(config)
    assert [shard.number for shard in shards] == [0, 1]
    assert all((shard.img_embeddings_url is None) == in_shards for shard in shards)
