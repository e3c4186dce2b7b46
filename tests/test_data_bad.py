"""Bad data: skipped, counted by reason, batch counts kept; too much of it stops the run."""

import logging
import os
import tarfile

import numpy as np
import pytest

from dalle2_decoder.data import BadDataError, DataSetupError, create_dataloaders

try:
    from .data_fixtures import add_member, data_config, jpeg_bytes, keys_of, npy_bytes, truncate_inside, write_dataset
except ImportError:
    from data_fixtures import add_member, data_config, jpeg_bytes, keys_of, npy_bytes, truncate_inside, write_dataset


def read(config, **kwargs):
    loader = create_dataloaders(config, seed=0, **kwargs)["train"]
    batches = list(loader)
    assert len(batches) == len(loader)
    return loader, batches


def expect_skipped(dataset, batches, loader, bad_keys, reason, total):
    keys = keys_of(batches)
    assert not set(keys) & set(bad_keys)
    assert set(keys) == set(dataset.keys) - set(bad_keys)
    assert loader.stats[reason] == len(bad_keys)
    assert loader.stats["seen"] == total and loader.stats["ok"] == total - len(bad_keys)
    # The rank still yields its planned batches: the gaps are filled with repeats, and reported.
    assert sum(len(b["key"]) for b in batches) == total and loader.stats["padded"] == len(bad_keys)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_and_missing_images(tmp_path, num_workers):
    truncated_jpeg = jpeg_bytes(5)[: len(jpeg_bytes(5)) // 2]
    overrides = {
        "0000000001": {"jpg": b"this is not a jpeg"},
        "0000010002": {"jpg": truncated_jpeg},
        "0000010003": {"jpg": None},  # no image at all
    }
    dataset = write_dataset(str(tmp_path), [6, 6], overrides=overrides)
    config = data_config(dataset, num_workers=num_workers, max_bad_sample_fraction=0.5)
    loader, batches = read(config)
    keys = set(keys_of(batches))
    assert keys == set(dataset.keys) - set(overrides)
    assert loader.stats["corrupt_image"] == 2 and loader.stats["no_image"] == 1
    assert loader.stats["seen"] == 12 and loader.stats["ok"] == 9 and loader.stats["padded"] == 3
    assert len(batches) == 3 and [len(b["key"]) for b in batches] == [4, 4, 4]


def test_zero_embedding_row_means_missing(tmp_path):
    dataset = write_dataset(str(tmp_path), [5, 5], zero_rows=["0001004"], index_width=3, shard_width=4)
    config = data_config(dataset, index_width=3, shard_width=4, max_bad_sample_fraction=0.5)
    loader, batches = read(config)
    expect_skipped(dataset, batches, loader, ["0001004"], "missing_embedding", 10)


def test_wrong_dimension_and_corrupt_embedding_members(tmp_path):
    overrides = {
        "0000000002": {"img_emb.npy": npy_bytes(np.ones(7, np.float32))},
        "0000000003": {"img_emb.npy": b"garbage"},
    }
    dataset = write_dataset(str(tmp_path), [8], embeddings="shard", overrides=overrides)
    loader, batches = read(data_config(dataset, max_bad_sample_fraction=0.5))
    assert set(keys_of(batches)) == set(dataset.keys) - set(overrides)
    assert loader.stats["wrong_embedding_dim"] == 1 and loader.stats["corrupt_embedding"] == 1


def test_embedding_dim_expected_by_the_model_is_enforced(tmp_path):
    dataset = write_dataset(str(tmp_path), [8], dim=8)
    with pytest.raises(BadDataError, match="wrong_embedding_dim 8"):
        read(data_config(dataset), image_embed_dim=16)


def test_image_size_mismatch_is_skipped(tmp_path):
    dataset = write_dataset(str(tmp_path), [6], overrides={"0000000004": {"jpg": jpeg_bytes(3, size=16)}})
    loader, batches = read(data_config(dataset, max_bad_sample_fraction=0.5))
    expect_skipped(dataset, batches, loader, ["0000000004"], "image_size_mismatch", 6)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_tar_loses_only_the_samples_after_the_break(tmp_path, num_workers):
    dataset = write_dataset(str(tmp_path), [6, 10, 6])
    path = dataset.shard_path(1, 6)
    config = data_config(dataset, num_workers=num_workers, batch_size=5, max_bad_sample_fraction=0.5)
    # Counting happens from the sizes the shards had when planned: the shard breaks after that.
    loader = create_dataloaders(config, seed=0)["train"]
    truncate_inside(path, dataset.keys_by_shard[1][4])  # 4 whole samples, then the 5th breaks off
    batches = list(loader)
    assert len(batches) == len(loader)
    lost = dataset.keys_by_shard[1][4:]
    expect_skipped(dataset, batches, loader, lost, "truncated_tar", 22)
    assert loader.stats["shard_read_errors"] >= 1


def test_truncated_tar_counted_from_headers(tmp_path):
    dataset = write_dataset(str(tmp_path), [6, 10])
    truncate_inside(dataset.shard_path(1, 6), dataset.keys_by_shard[1][4])
    loader, batches = read(data_config(dataset))
    # Counting the local tar already finds 4 whole samples in the broken shard: nothing is bad.
    assert sorted(keys_of(batches)) == sorted(dataset.keys_by_shard[0] + dataset.keys_by_shard[1][:4])
    assert loader.stats["seen"] == loader.stats["ok"] == 10


def test_too_many_bad_samples_stop_the_phase(tmp_path):
    overrides = {f"000000000{i}": {"jpg": b"junk"} for i in range(3)}
    dataset = write_dataset(str(tmp_path), [10, 10], overrides=overrides)
    with pytest.raises(BadDataError, match=r"3 of 20 samples \(15.0%\) are bad.*corrupt_image 3"):
        read(data_config(dataset, max_bad_sample_fraction=0.1))
    loader, _ = read(data_config(dataset, max_bad_sample_fraction=0.2))
    assert loader.stats["corrupt_image"] == 3


def test_bad_fraction_judged_mid_phase_once_enough_was_seen(tmp_path):
    # 600 samples, all bad from the start: the worker stops long before the end of the phase.
    overrides = {f"{i // 100:06d}{i % 100:04d}": {"jpg": b"junk"} for i in range(600)}
    dataset = write_dataset(str(tmp_path), [100] * 6, overrides=overrides)
    with pytest.raises(BadDataError, match="500 samples"):
        read(data_config(dataset, batch_size=600))


def test_shard_without_embedding_file_is_skipped_with_a_warning(tmp_path, caplog):
    dataset = write_dataset(str(tmp_path), [3, 3, 3])
    os.remove(os.path.join(dataset.img_embeddings_url, "img_emb_00001.npy"))
    with caplog.at_level(logging.WARNING, logger="dalle2_decoder.data"):
        loader, batches = read(data_config(dataset))
    assert sorted(keys_of(batches)) == sorted(dataset.keys_by_shard[0] + dataset.keys_by_shard[2])
    assert "1 shard(s) have no embedding file" in caplog.text and ": 1" in caplog.text


def test_missing_local_shards_listed_at_start(tmp_path, caplog):
    dataset = write_dataset(str(tmp_path), [2] * 8)
    for number in (1, 4, 5):
        os.remove(dataset.shard_path(number, 6))
    with pytest.raises(DataSetupError, match=r"3 shard\(s\) .* missing in 0..7: 1, 4-5"):
        create_dataloaders(data_config(dataset), seed=0)
    with pytest.raises(DataSetupError, match=r"missing in 0..9: 1, 4-5, 8-9"):
        create_dataloaders(data_config(dataset, end_shard=9), seed=0)
    with caplog.at_level(logging.WARNING, logger="dalle2_decoder.data"):
        loader, batches = read(data_config(dataset, skip_missing_shards=True))
    assert "missing in 0..7: 1, 4-5; leaving them out" in caplog.text
    assert {key[:6] for key in keys_of(batches)} == {"000000", "000002", "000003", "000006", "000007"}


def test_unreadable_embedding_file_counts_its_samples(tmp_path):
    dataset = write_dataset(str(tmp_path), [4, 4])
    with open(os.path.join(dataset.img_embeddings_url, "img_emb_00001.npy"), "wb") as file:
        file.write(b"not an npy file")
    loader, batches = read(data_config(dataset, max_bad_sample_fraction=0.5))
    expect_skipped(dataset, batches, loader, dataset.keys_by_shard[1], "unreadable_embeddings", 8)


def test_key_without_index_digits(tmp_path):
    dataset = write_dataset(str(tmp_path), [4])
    with tarfile.open(dataset.shard_path(0, 6), "a") as archive:
        add_member(archive, "000000abcd.jpg", jpeg_bytes(1))
    loader, batches = read(data_config(dataset, max_bad_sample_fraction=0.5))
    assert loader.stats["bad_key"] == 1 and loader.stats["padded"] == 1
    assert set(keys_of(batches)) == set(dataset.keys) and len(keys_of(batches)) == 5
