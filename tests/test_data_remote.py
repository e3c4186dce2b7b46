"""Shards and embedding folders over http (local HTTP server), s3 (moto server) and pipe: commands.

Every server listens on 127.0.0.1 only.
"""

import functools
import http.server
import os
import shutil
import sysconfig
import threading

import boto3
import numpy as np
import pytest
from moto.server import ThreadedMotoServer

from dalle2_decoder.data import create_dataloaders

try:
    from .data_fixtures import data_config, keys_of, write_dataset
except ImportError:
    from data_fixtures import data_config, keys_of, write_dataset

SIZES = [5, 7, 4]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """(folder, url): a folder served over http on loopback."""
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield str(tmp_path), f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def s3_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", s3_endpoint),
    ):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_endpoint


def upload(root, bucket, endpoint):
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=bucket)
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            client.upload_file(path, bucket, os.path.relpath(path, root))


def check(loader, dataset, expected_keys=None):
    batches = list(loader)
    keys = keys_of(batches)
    assert sorted(keys) == sorted(expected_keys or dataset.keys) and len(batches) == len(loader)
    for batch in batches:
        for key, row in zip(batch["key"], batch["image_embed"]):
            np.testing.assert_array_equal(row.numpy(), dataset.image_embeds[key])
        assert batch["caption"] == [dataset.captions[key] for key in batch["key"]]
    return batches


@pytest.mark.parametrize("with_sizes_file", [False, True])
def test_http_shards_and_embedding_folder(http_root, with_sizes_file):
    folder, url = http_root
    dataset = write_dataset(folder, SIZES, shard_width=4, index_width=3, text=True)
    if with_sizes_file:  # a wrong size would show: the loader must take these numbers as given
        with open(os.path.join(folder, "shards", "sizes.json"), "w") as file:
            file.write('{"0000.tar": 5, "0001.tar": 7, "0002.tar": 4}')
    config = data_config(
        dataset,
        webdataset_base_url=f"{url}/shards/{{}}.tar",
        end_shard=2,
        shard_width=4,
        index_width=3,
        img_embeddings_url=f"{url}/img_emb/",
        text_embeddings_url=f"{url}/text_emb/",
        num_workers=2,
    )
    check(create_dataloaders(config, seed=0)["train"], dataset)


def test_http_needs_an_explicit_end_shard(http_root):
    folder, url = http_root
    dataset = write_dataset(folder, SIZES)
    with pytest.raises(ValueError, match="end_shard must be set"):
        create_dataloaders(data_config(dataset, webdataset_base_url=f"{url}/shards/{{}}.tar"), seed=0)


def test_http_missing_shard_is_counted_not_fatal(http_root):
    folder, url = http_root
    dataset = write_dataset(folder, SIZES, embeddings="shard")
    config = data_config(
        dataset, webdataset_base_url=f"{url}/shards/{{}}.tar", end_shard=3, max_bad_sample_fraction=0.5
    )
    loader = create_dataloaders(config, seed=0, epoch_samples=20)["train"]
    assert len(list(loader)) == 5  # shard 3 does not exist: the worker cycles through the others
    assert loader.stats["shard_read_errors"] >= 1


def test_s3_shards_and_embeddings(tmp_path, s3_env):
    dataset = write_dataset(str(tmp_path), SIZES, shard_width=5, index_width=4)
    upload(str(tmp_path), "data-bucket", s3_env)
    config = data_config(
        dataset,
        webdataset_base_url="s3://data-bucket/shards/{}.tar",
        shard_width=5,
        img_embeddings_url="s3://data-bucket/img_emb",
        num_workers=2,
        batch_size=3,
    )
    check(create_dataloaders(config, seed=0)["train"], dataset)


def test_s3_missing_shards_listed(tmp_path, s3_env):
    dataset = write_dataset(str(tmp_path), [2, 2, 2, 2])
    os.remove(dataset.shard_path(2, 6))
    upload(str(tmp_path), "gappy-bucket", s3_env)
    config = data_config(
        dataset, webdataset_base_url="s3://gappy-bucket/shards/{}.tar", img_embeddings_url="s3://gappy-bucket/img_emb"
    )
    with pytest.raises(ValueError, match=r"1 shard\(s\) .* missing in 0..3: 2"):
        create_dataloaders(config, seed=0)


def test_pipe_cat_shards(tmp_path):
    dataset = write_dataset(str(tmp_path), SIZES)
    base = "pipe:cat " + os.path.join(str(tmp_path), "shards", "{}.tar")
    config = data_config(dataset, webdataset_base_url=base, end_shard=2, num_workers=2)
    check(create_dataloaders(config, seed=0)["train"], dataset)


def test_pipe_aws_s3_cp(tmp_path, s3_env):
    # `make test` installs the aws CLI in a tools venv of its own and puts it on PATH (see the Makefile);
    # an environment that has it in its own scripts folder works too.
    aws = shutil.which("aws", path=os.pathsep.join([os.environ.get("PATH", ""), sysconfig.get_path("scripts")]))
    assert aws, "the aws command line is needed for pipe: shards from s3 (make test installs it in .venv-tools)"
    dataset = write_dataset(str(tmp_path), SIZES, embeddings="shard")
    upload(str(tmp_path), "pipe-bucket", s3_env)
    base = f"pipe:{aws} --endpoint-url {s3_env} s3 cp s3://pipe-bucket/shards/{{}}.tar -"
    config = data_config(dataset, webdataset_base_url=base, end_shard=2, num_workers=1)
    check(create_dataloaders(config, seed=0)["train"], dataset)
