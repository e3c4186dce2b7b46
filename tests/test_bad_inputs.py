"""Bad inputs, as a new user makes them: each is caught as early as it can be (the config check,
then the world check before training, then the data while it is read), reported as one line that
names what and where, with an exit status that says the kind (docs/TROUBLESHOOTING.md), and no
traceback.

Most cases run the commands' `main()` in this process with captured output (the same code the
installed commands run); a few run the real commands as subprocesses, and the cases that need a
read-only or full filesystem run in one subprocess with a mount of its own (`unshare`).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from dalle2_decoder import cli
from dalle2_decoder.data import BadDataError, create_dataloaders
from dalle2_decoder.evaluate import main as evaluate_main
from dalle2_decoder.failures import EXIT_BUG, EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_DATA, EXIT_IO, EXIT_USAGE, report
from dalle2_decoder.tracking.checkpoint import CHECKPOINT_FORMAT, MODEL_FORMAT

from .conftest import REPO_ROOT
from .data_fixtures import data_config, keys_of, write_dataset
from .training_fixtures import EMBED_DIM, tiny_config, write_tiny_demo

HUGE_NESTING = "[" * 100_000 + "]" * 100_000


# --- helpers ----------------------------------------------------------------------------------


def set_path(raw: Dict[str, Any], path: str, value: Any) -> Dict[str, Any]:
    assert cli.apply_override(raw, path, value) == [], path
    return raw


def error_lines(err: str) -> List[str]:
    """The report's lines; a problem listed under a `FILE: N problems` header is read with it."""
    lines, header = [], ""
    for line in err.splitlines():
        if not line.strip() or line.startswith("warning:"):
            continue
        if line.endswith(("problem", "problems")) and ": " in line:
            header = line
            lines.append(line)
        else:
            lines.append(f"{header} {line.strip()}" if header and line.startswith("  ") else line)
    return lines


def assert_reported(code: int, err: str, expected_code: int, needles: Sequence[str], out: str = "") -> None:
    """The exit status, no traceback, and one line holding every needle (what and where)."""
    assert code == expected_code, err
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = error_lines(err)
    assert lines, "nothing reported"
    assert any(all(needle in line for needle in needles) for line in lines), (needles, err)
    assert len(lines) <= 6, err  # a few lines at most: one per problem (and a header)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Dict[str, Any]:
    """The tiny demo dataset (6 shards of 16 images of 16px, 32-dimensional embeddings), written once."""
    return write_tiny_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture
def world(tmp_path, demo) -> SimpleNamespace:
    """A private copy of the demo data and a config that trains on it on the CPU: valid as it is."""
    source = Path(demo["webdataset_base_url"]).parent.parent
    root = tmp_path / "data"
    shutil.copytree(source, root)
    data = {
        key: (value.replace(str(source), str(root)) if isinstance(value, str) else value) for key, value in demo.items()
    }
    raw = tiny_config(data, tmp_path / "run")
    raw["tracker"]["log"]["auto_resume"] = False
    return SimpleNamespace(tmp=tmp_path, data=root, raw=raw)


def run_check(capsys, world, raw_or_path, *extra: str):
    path = raw_or_path if isinstance(raw_or_path, (str, Path)) else world.tmp / "config.json"
    if not isinstance(raw_or_path, (str, Path)):
        path.write_text(json.dumps(raw_or_path))
    code = cli.main(["--config_file", str(path), "--check", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_base_config_passes_every_check(capsys, world):
    code, out, err = run_check(capsys, world, world.raw)
    assert code == 0, err
    assert json.loads(out)["train"]["device"] == "cpu"


# --- the config alone (--check --no-io) -----------------------------------------------------

Change = Callable[[Dict[str, Any], SimpleNamespace], Any]


def sets(**paths: Any) -> Change:
    """A change setting `train__lr=1` style paths (double underscores for dots, `_0_` for [0])."""

    def change(raw, world):
        for key, value in paths.items():
            set_path(raw, key.replace("__", ".").replace("_0_", "[0]"), value)
        return raw

    return change


def file_with(content: bytes) -> Change:
    def change(raw, world):
        path = world.tmp / "written.json"
        path.write_bytes(content)
        return path

    return change


def drop(section: str, key: str = "") -> Change:
    def change(raw, world):
        if key:
            del raw[section][key]
        else:
            del raw[section]
        return raw

    return change


def unet_option(name: str, value: Any) -> Change:
    def change(raw, world):
        raw["decoder"]["unets"][0][name] = value
        return raw

    return change


CONFIG_CASES = [
    # (id, change, exit status, needles that one line must hold)
    ("seed-negative", sets(seed=-1), EXIT_CONFIG, ["seed:", "0..4294967295", "got -1"]),
    ("seed-huge", sets(seed=2**70), EXIT_CONFIG, ["seed:", str(2**70)]),
    ("seed-string", sets(seed="abc"), EXIT_CONFIG, ["seed:", "integer"]),
    ("attn-heads-zero", unet_option("attn_heads", 0), EXIT_CONFIG, ["decoder.unets[0].attn_heads", "at least 1"]),
    ("attn-heads-negative", unet_option("attn_heads", -4), EXIT_CONFIG, ["decoder.unets[0].attn_heads", "got -4"]),
    ("attn-dim-head-zero", unet_option("attn_dim_head", 0), EXIT_CONFIG, ["decoder.unets[0].attn_dim_head"]),
    (
        "image-size-33",
        sets(decoder__image_sizes=[33]),
        EXIT_CONFIG,
        ["decoder.image_sizes[0]", "33", "not divisible by 2"],
    ),
    ("image-size-2", sets(decoder__image_sizes=[2]), EXIT_CONFIG, ["decoder.image_sizes[0]", "2 is too small"]),
    (
        "image-size-below-downsampling",
        unet_option("dim_mults", [1, 2, 4, 8, 16, 32]),
        EXIT_CONFIG,
        ["decoder.image_sizes[0]", "16 is too small", "at least 32"],
    ),
    (
        "image-size-memory-efficient",
        lambda raw, w: set_path(unet_option("memory_efficient", True)(raw, w), "decoder.image_sizes", [18]),
        EXIT_CONFIG,
        ["decoder.image_sizes[0]", "not divisible by 4"],
    ),
    (
        "url-without-braces",
        sets(data__webdataset_base_url="/data/shards/000000.tar"),
        EXIT_CONFIG,
        ["data.webdataset_base_url", "{}", "000000.tar"],
    ),
    (
        "url-with-two-braces",
        sets(data__webdataset_base_url="/data/{}/{}.tar"),
        EXIT_CONFIG,
        ["data.webdataset_base_url", "exactly once"],
    ),
    (
        "splits-train-zero",
        sets(data__splits={"train": 0, "val": 0.5, "test": 0.5}),
        EXIT_CONFIG,
        ["data.splits.train", "no shard to train on"],
    ),
    ("splits-sum", sets(data__splits={"train": 0.9}), EXIT_CONFIG, ["data.splits", "sum to 1"]),
    (
        "one-shard-range",
        sets(data__start_shard=2, data__end_shard=2),
        EXIT_CONFIG,
        ["data.end_shard", "2..2 holds 1 shard", "3 splits"],
    ),
    (
        "two-shard-range-three-splits",
        sets(data__start_shard=0, data__end_shard=1),
        EXIT_CONFIG,
        ["data.end_shard", "holds 2 shards"],
    ),
    # JSON's 1e309 is read as infinity: a run would train to NaN weights
    (
        "lr-1e309",
        lambda raw, w: file_with(json.dumps(raw).replace('"lr": 0.001', '"lr": 1e309').encode())(raw, w),
        EXIT_CONFIG,
        ["train.lr", "finite", "Infinity"],
    ),
    ("lr-nan", sets(train__lr=float("nan")), EXIT_CONFIG, ["train.lr", "finite", "NaN"]),
    ("lr-absurd", sets(train__lr=5), EXIT_CONFIG, ["train.lr", "5", "far above"]),
    ("lr-absurd-per-unet", sets(train__lr=[10.0]), EXIT_CONFIG, ["train.lr[0]", "far above"]),
    ("lr-negative", sets(train__lr=-1e-4), EXIT_CONFIG, ["train.lr", "at least 0"]),
    ("lr-zero", sets(train__lr=0), EXIT_CONFIG, ["train.lr", "greater than 0"]),
    ("wd-infinite", sets(train__wd=float("inf")), EXIT_CONFIG, ["train.wd", "finite", "Infinity"]),
    ("ema-beta-2", sets(train__ema_beta=2), EXIT_CONFIG, ["train.ema_beta", "[0.0, 1.0]"]),
    ("epochs-zero", sets(train__epochs=0), EXIT_CONFIG, ["train.epochs", "at least 1"]),
    ("epochs-string", sets(train__epochs="ten"), EXIT_CONFIG, ["train.epochs", "integer", "ten"]),
    ("batch-size-zero", sets(data__batch_size=0), EXIT_CONFIG, ["data.batch_size", "at least 1"]),
    ("workers-negative", sets(data__num_workers=-1), EXIT_CONFIG, ["data.num_workers", "at least 0"]),
    ("bad-fraction-2", sets(data__max_bad_sample_fraction=2), EXIT_CONFIG, ["data.max_bad_sample_fraction"]),
    ("empty-embedding-url", sets(data__img_embeddings_url=""), EXIT_CONFIG, ["data.img_embeddings_url", "empty"]),
    ("timesteps-zero", sets(decoder__timesteps=0), EXIT_CONFIG, ["decoder.timesteps", "at least 1"]),
    ("loss-type", sets(decoder__loss_type="l3"), EXIT_CONFIG, ["decoder.loss_type", "l3"]),
    (
        "sizes-decreasing",
        lambda raw, w: set_path(
            set_path(raw, "decoder.unets", raw["decoder"]["unets"] * 2), "decoder.image_sizes", [32, 16]
        ),
        EXIT_CONFIG,
        ["decoder.image_sizes", "increase"],
    ),
    ("sizes-count", sets(decoder__image_sizes=[16, 32]), EXIT_CONFIG, ["decoder.image_sizes", "2 sizes", "1 U-Nets"]),
    (
        "mask-all-false",
        sets(train__unet_training_mask=[False]),
        EXIT_CONFIG,
        ["train.unet_training_mask", "every U-Net"],
    ),
    ("device-nonsense", sets(train__device="gpu0"), EXIT_CONFIG, ["train.device", "not a device"]),
    ("unknown-section", lambda raw, w: dict(raw, trian={}), EXIT_CONFIG, ["trian", "unknown option"]),
    (
        "misspelled-option",
        unet_option("dim_mult", [1, 2]),
        EXIT_CONFIG,
        ["decoder.unets[0].dim_mult", "did you mean dim_mults"],
    ),
    ("missing-decoder", drop("decoder"), EXIT_CONFIG, ["decoder", "required section missing"]),
    ("missing-base-url", drop("data", "webdataset_base_url"), EXIT_CONFIG, ["data.webdataset_base_url"]),
    ("missing-save", drop("tracker", "save"), EXIT_CONFIG, ["tracker.save"]),
    ("log-type-typo", sets(tracker__log={"log_type": "consol"}), EXIT_CONFIG, ["tracker.log"]),
    ("unknown-transform", sets(data__preprocessing={"Resise": 16}), EXIT_CONFIG, ["Resise", "Resize"]),
    ("transform-arguments", sets(data__preprocessing={"Resize": {"sise": 16}}), EXIT_CONFIG, ["Resize", "sise"]),
    ("config-is-a-list", lambda raw, w: [raw], EXIT_CONFIG, ["must be a JSON object"]),
    ("not-utf8", file_with(b'{"seed": "\xff\xfe caf\xe9"}'), EXIT_CONFIG, ["written.json", "not UTF-8", "0xff"]),
    ("nested-too-deeply", file_with(HUGE_NESTING.encode()), EXIT_CONFIG, ["written.json", "nested too deeply"]),
    ("invalid-json", file_with(b'{"seed": 1,}'), EXIT_CONFIG, ["written.json", "not valid JSON", "line 1"]),
    ("empty-file", file_with(b""), EXIT_CONFIG, ["written.json", "not valid JSON"]),
    ("config-missing", lambda raw, w: w.tmp / "nowhere.json", EXIT_CONFIG, ["nowhere.json", "cannot read the file"]),
    ("config-is-a-folder", lambda raw, w: w.tmp, EXIT_CONFIG, [str(Path("/")), "is a folder"]),
]


@pytest.mark.parametrize("name, change, code, needles", CONFIG_CASES, ids=[case[0] for case in CONFIG_CASES])
def test_config_mistakes_are_found_by_the_config_check(capsys, world, name, change, code, needles):
    target = change(copy.deepcopy(world.raw), world)
    result = run_check(capsys, world, target, "--no-io")
    assert_reported(result[0], result[2], code, needles, out=result[1])
    assert result[1] == ""  # nothing on stdout: no resolved config for a broken one
    # Training makes the same checks first: it stops the same way, before anything is built.
    path = target if isinstance(target, (str, Path)) else world.tmp / "config.json"
    code_training = cli.main(["--config_file", str(path)])
    out, err = capsys.readouterr()
    assert_reported(code_training, err, code, needles, out=out)


# --- the world the config points at (--check) -------------------------------------------------


def remove_shards(*numbers: int) -> Change:
    def change(raw, world):
        for number in numbers:
            (world.data / "shards" / f"{number:06d}.tar").unlink()
        return raw

    return change


def replace_embedding_file(dim: int, rows: int = 16, number: int = 0) -> Change:
    def change(raw, world):
        folder = world.data / "img_emb"
        (path,) = folder.glob(f"*_{number:06d}.npy")
        np.save(path, np.ones((rows, dim), np.float32))
        return raw

    return change


def _cuda_device() -> str:
    return "cuda:0" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


def _write_file(name: str, content: bytes) -> Callable[[SimpleNamespace], Path]:
    def write(world):
        path = world.tmp / name
        path.write_bytes(content)
        return path

    return write


def load_from(make_path: Callable[[SimpleNamespace], Path]) -> Change:
    def change(raw, world):
        raw["tracker"]["load"] = {"load_from": "local", "file_path": str(make_path(world))}
        return raw

    return change


def _folder(world):
    return world.tmp


def _missing(world):
    return world.tmp / "no-such-checkpoint.pth"


def _safetensors_garbage(world):
    path = world.tmp / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    return path


def _path_through_a_file(raw, world):
    (world.tmp / "a-file").write_text("x")
    raw["tracker"]["save"][0]["save_latest_to"] = str(world.tmp / "a-file" / "latest.pth")
    return raw


def _data_path_is_a_file(raw, world):
    (world.tmp / "run-file").write_text("x")
    raw["tracker"]["data_path"] = str(world.tmp / "run-file")
    return raw


def _embeddings_folder_is_a_file(raw, world):
    (world.tmp / "emb-file").write_text("x")
    raw["data"]["img_embeddings_url"] = str(world.tmp / "emb-file")
    return raw


def _embeddings_in_shards_wrong_dim(raw, world):
    dataset = write_dataset(str(world.tmp / "in-shards"), [4, 4, 4], dim=12, embeddings="shard")
    raw["data"].update(
        webdataset_base_url=dataset.base_url,
        img_embeddings_url=None,
        text_embeddings_url=None,
        end_shard=2,
        splits={"train": 0.34, "val": 0.33, "test": 0.33},
    )
    return raw


def _text_folder_missing(raw, world):
    raw["data"]["text_embeddings_url"] = str(world.tmp / "no-text-embeddings")
    return raw


WORLD_CASES = [
    ("device-cuda-without-cuda", sets(train__device=_cuda_device()), EXIT_IO, ["train.device", _cuda_device()]),
    (
        "shards-missing",
        sets(data__webdataset_base_url="/nonexistent/shards/{}.tar"),
        EXIT_DATA,
        ["data.webdataset_base_url", "/nonexistent/shards/{}.tar"],
    ),
    ("shard-gap", remove_shards(3), EXIT_DATA, ["data.webdataset_base_url", "missing in 0..5: 3"]),
    (
        "range-beyond-shards",
        sets(data__start_shard=10, data__end_shard=20),
        EXIT_DATA,
        ["data.webdataset_base_url", "10..20"],
    ),
    (
        "one-shard-found",
        lambda raw, w: set_path(remove_shards(1, 2, 3, 4, 5)(raw, w), "data.end_shard", 9999999),
        EXIT_DATA,
        ["data.splits", "1 shard(s) found", "3 splits"],
    ),
    (
        "embeddings-folder-missing",
        sets(data__img_embeddings_url="/nonexistent/img_emb"),
        EXIT_DATA,
        ["data.img_embeddings_url", "/nonexistent/img_emb", "does not exist"],
    ),
    (
        "embeddings-folder-is-a-file",
        _embeddings_folder_is_a_file,
        EXIT_DATA,
        ["data.img_embeddings_url", "not a folder"],
    ),
    (
        "text-embeddings-folder-missing",
        _text_folder_missing,
        EXIT_DATA,
        ["data.text_embeddings_url", "no-text-embeddings", "does not exist"],
    ),
    (
        "embedding-dim-wrong",
        replace_embedding_file(dim=48),
        EXIT_DATA,
        ["data.img_embeddings_url", "img_emb_000000.npy", f"expected {EMBED_DIM}, got 48"],
    ),
    (
        "embedding-dim-vs-model",
        sets(
            **{
                "decoder__unets": [
                    {"dim": 8, "image_embed_dim": 64, "dim_mults": [1, 2], "attn_heads": 2, "attn_dim_head": 8}
                ]
            }
        ),
        EXIT_DATA,
        ["data.img_embeddings_url", "decoder.unets[0].image_embed_dim", "expected 64, got 32"],
    ),
    (
        "embedding-rows-fewer-than-samples",
        replace_embedding_file(dim=EMBED_DIM, rows=10, number=1),
        EXIT_DATA,
        ["data.img_embeddings_url", "img_emb_000001.npy has 10 rows", "000001.tar holds 16 samples", "sizes.json"],
    ),
    (
        "embedding-file-missing",
        lambda raw, w: (next((w.data / "img_emb").glob("*_000004.npy")).unlink(), raw)[1],
        EXIT_DATA,
        ["data.img_embeddings_url", "1 of 6 shard(s)", ": 4"],
    ),
    (
        "shard-not-a-tar",
        lambda raw, w: ((w.data / "shards" / "000002.tar").write_bytes(b"<html>gone</html>"), raw)[1],
        EXIT_DATA,
        ["data.webdataset_base_url", "1 shard(s) are not tar archives", "000002.tar", "shorter than one"],
    ),
    (
        "shard-empty",
        lambda raw, w: ((w.data / "shards" / "000002.tar").write_bytes(b""), raw)[1],
        EXIT_DATA,
        ["data.webdataset_base_url", "000002.tar (the file is empty)"],
    ),
    (
        "embeddings-in-shards-wrong-dim",
        _embeddings_in_shards_wrong_dim,
        EXIT_DATA,
        ["img_emb.npy", "expected 32, got 12"],
    ),
    ("data-path-is-a-file", _data_path_is_a_file, EXIT_IO, ["tracker.data_path", "run-file", "not a folder"]),
    (
        "data-path-not-empty",
        lambda raw, w: (w.tmp.joinpath("run").mkdir(), w.tmp.joinpath("run", "old.txt").write_text("x"), raw)[2],
        EXIT_IO,
        ["tracker.data_path", "is not empty", "overwrite_data_path"],
    ),
    (
        "data-path-holds-a-finished-run",
        lambda raw, w: (
            w.tmp.joinpath("run").mkdir(),
            w.tmp.joinpath("run", "run_state.json").write_text(json.dumps({"run_id": "r17", "finished": True})),
            raw,
        )[2],
        EXIT_IO,
        ["tracker.data_path", "holds the finished run r17"],
    ),
    (
        "data-path-interrupted-without-auto-resume",
        lambda raw, w: (
            w.tmp.joinpath("run").mkdir(),
            w.tmp.joinpath("run", "run_state.json").write_text(json.dumps({"run_id": "r18", "step": 40})),
            raw,
        )[2],
        EXIT_IO,
        ["tracker.data_path", "interrupted run r18 (step 40)", "auto_resume"],
    ),
    ("save-path-through-a-file", _path_through_a_file, EXIT_IO, ["tracker.save[0].save_latest_to", "a-file"]),
    (
        "load-missing",
        load_from(_missing),
        EXIT_CHECKPOINT,
        ["tracker.load.file_path", "no-such-checkpoint.pth", "not found"],
    ),
    ("load-folder", load_from(_folder), EXIT_CHECKPOINT, ["tracker.load.file_path", "is a folder"]),
    (
        "load-empty",
        load_from(_write_file("empty.pth", b"")),
        EXIT_CHECKPOINT,
        ["tracker.load.file_path", "empty.pth", "is empty"],
    ),
    (
        "load-text-file",
        load_from(_write_file("notes.pth", b"these are my notes\n" * 10)),
        EXIT_CHECKPOINT,
        ["tracker.load.file_path", "notes.pth", "not a checkpoint"],
    ),
    (
        "load-bad-safetensors",
        load_from(_safetensors_garbage),
        EXIT_CHECKPOINT,
        ["tracker.load.file_path", "model.safetensors", "not a safetensors file"],
    ),
]


@pytest.mark.parametrize("name, change, code, needles", WORLD_CASES, ids=[case[0] for case in WORLD_CASES])
def test_world_mistakes_are_found_before_training(capsys, monkeypatch, world, name, change, code, needles):
    target = change(copy.deepcopy(world.raw), world)
    result = run_check(capsys, world, target)
    assert_reported(result[0], result[2], code, needles, out=result[1])
    # --no-io leaves the world alone: the config itself is fine.
    assert run_check(capsys, world, target, "--no-io")[0] == 0
    # Training runs the same check first and never reaches the training loop.
    monkeypatch.setattr(cli, "train", lambda config: pytest.fail("training started"))
    assert cli.main(["--config_file", str(world.tmp / "config.json")]) == code
    capsys.readouterr()


# --- data problems found while reading ----------------------------------------------------------


def odd_image(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_one_odd_image_does_not_poison_the_ones_after_it(tmp_path, caplog):
    # 300x100 before Resize(8) is 24x8 after it; every other image is 8x8. The odd one comes first.
    dataset = write_dataset(str(tmp_path), [20], overrides={"0000000000": {"jpg": None, "png": odd_image(300, 100)}})
    config = data_config(dataset, preprocessing={"Resize": 8, "ToTensor": True}, max_bad_sample_fraction=0.5)
    with caplog.at_level(logging.WARNING):
        loader = create_dataloaders(config, seed=0)["train"]
        batches = list(loader)
    assert loader.stats["image_size_mismatch"] == 1
    assert sorted(set(keys_of(batches))) == sorted(dataset.keys[1:])
    assert any(
        "image_size_mismatch: sample '0000000000'" in r.message and "is 8x24" in r.message and "needs 8x8" in r.message
        for r in caplog.records
    )


def test_a_preprocessing_with_a_fixed_size_takes_odd_images_in(tmp_path):
    dataset = write_dataset(str(tmp_path), [6], overrides={"0000000000": {"jpg": None, "png": odd_image(300, 100)}})
    config = data_config(dataset, preprocessing={"Resize": 8, "CenterCrop": 8, "ToTensor": True})
    loader = create_dataloaders(config, seed=0)["train"]
    assert sorted(keys_of(list(loader))) == sorted(dataset.keys)
    assert loader.stats["image_size_mismatch"] == 0


def _sizes_json(tmp_path, content) -> None:
    (tmp_path / "shards" / "sizes.json").write_text(json.dumps(content))


@pytest.mark.parametrize(
    "recorded, why",
    [
        ({"000000.tar": {"samples": 2, "bytes": 999}, "000001.tar": {"samples": 2, "bytes": 999}}, "bytes recorded"),
        ({"000000.tar": 2, "000001.tar": 2}, "samples recorded"),  # the older format, checked by counting
    ],
)
def test_an_understated_sizes_json_is_noticed_and_named(tmp_path, caplog, recorded, why):
    dataset = write_dataset(str(tmp_path), [8, 8])
    _sizes_json(tmp_path, recorded)
    with caplog.at_level(logging.WARNING):
        loader = create_dataloaders(data_config(dataset), seed=0)["train"]
        batches = list(loader)
    assert sorted(keys_of(batches)) == sorted(dataset.keys)  # the whole epoch, not a quarter of it
    assert any(
        "sizes.json is stale" in r.message and why in r.message and str(tmp_path) in r.message for r in caplog.records
    )


def test_an_overstated_sizes_json_does_not_make_intact_shards_truncated(tmp_path, caplog):
    dataset = write_dataset(str(tmp_path), [8, 8])
    stale = {
        name: {"samples": 30, "bytes": os.path.getsize(dataset.shard_path(n, 6)) + 512}
        for n, name in enumerate(["000000.tar", "000001.tar"])
    }
    _sizes_json(tmp_path, stale)  # written for bigger shards than these
    with caplog.at_level(logging.WARNING):
        loader = create_dataloaders(data_config(dataset, max_bad_sample_fraction=0.0), seed=0)["train"]
        batches = list(loader)
    assert sorted(keys_of(batches)) == sorted(dataset.keys)
    assert loader.stats["truncated_tar"] == 0 and loader.stats["padded"] == 0
    assert any("sizes.json is stale for 2 shard(s)" in r.message for r in caplog.records)


def test_a_count_from_sizes_json_is_named_when_the_shard_has_fewer(tmp_path):
    dataset = write_dataset(str(tmp_path), [8, 8])
    size = os.path.getsize(dataset.shard_path(1, 6))
    _sizes_json(
        tmp_path,
        {
            "000000.tar": {"samples": 8, "bytes": os.path.getsize(dataset.shard_path(0, 6))},
            "000001.tar": {"samples": 12, "bytes": size},
        },
    )
    with pytest.raises(BadDataError) as caught:
        list(create_dataloaders(data_config(dataset, max_bad_sample_fraction=0.0), seed=0)["train"])
    message = str(caught.value)
    assert "truncated_tar" in message and "sizes.json" in message and "000001.tar" in message


def test_a_file_that_is_not_a_tar_is_called_so(tmp_path, caplog):
    dataset = write_dataset(str(tmp_path), [4, 4])
    Path(dataset.shard_path(1, 6)).write_bytes(b"<html>404 Not Found</html>" * 40)
    with caplog.at_level(logging.WARNING):
        exact = create_dataloaders(data_config(dataset), seed=0)["train"]  # counted: no samples in it
        assert sorted(keys_of(list(exact))) == sorted(dataset.keys_by_shard[0])
        capped = create_dataloaders(data_config(dataset, max_bad_sample_fraction=0.9), seed=0, epoch_samples=8)["train"]
        list(capped)  # read in passes: the shard is tried, and named
    assert capped.stats["truncated_tar"] == 0 and capped.stats["shard_read_errors"] >= 1
    named = [r.message for r in caplog.records if "000001.tar" in r.message]
    assert named and all("not a tar archive" in m and "truncated" not in m for m in named), named


def test_a_pickled_npy_is_named_without_numpy_hint(tmp_path, caplog):
    dataset = write_dataset(str(tmp_path), [4, 4])
    (path,) = Path(dataset.img_embeddings_url).glob("*_00001.npy")
    np.save(path, np.array([{"not": "numbers"}] * 4, dtype=object), allow_pickle=True)
    with caplog.at_level(logging.WARNING):
        loader = create_dataloaders(data_config(dataset, max_bad_sample_fraction=0.9), seed=0)["train"]
        list(loader)
    assert loader.stats["unreadable_embeddings"] == 4
    messages = [r.message for r in caplog.records if "unreadable" in r.message]
    assert any(str(path) in m and "Python objects" in m for m in messages), messages
    assert not any("allow_pickle" in m for m in messages)


def test_a_wrong_embedding_dimension_states_expected_and_actual(tmp_path):
    dataset = write_dataset(str(tmp_path), [4], dim=12, embeddings="shard")
    with pytest.raises(BadDataError) as caught:
        list(
            create_dataloaders(
                data_config(dataset, img_embeddings_url=None, text_embeddings_url=None), seed=0, image_embed_dim=16
            )["train"]
        )
    message = str(caught.value)
    assert "wrong_embedding_dim" in message and "has 12 values, expected 16" in message and "img_emb.npy" in message


def test_a_bad_transform_shows_the_transform_and_its_error(tmp_path):
    dataset = write_dataset(str(tmp_path), [4])  # 8x8 images
    config = data_config(dataset, preprocessing={"RandomCrop": 64, "ToTensor": True})
    with pytest.raises(BadDataError) as caught:
        list(create_dataloaders(config, seed=0)["train"])
    message = str(caught.value)
    assert "transform_error" in message and "RandomCrop(size=(64, 64)" in message and "on a 8x8 image" in message
    assert "larger than input image size" in message


def test_wholly_bad_data_from_a_worker_is_one_line(tmp_path):
    overrides = {f"000000{index:04d}": {"jpg": b"not a jpeg"} for index in range(6)}
    dataset = write_dataset(str(tmp_path), [6], overrides=overrides)
    with pytest.raises(BadDataError) as caught:
        list(create_dataloaders(data_config(dataset, num_workers=1), seed=0)["train"])
    assert "DataLoader worker process" in str(caught.value)  # torch's wrapping, which the report removes
    stream = io.StringIO()
    assert report(caught.value, stream=stream) == EXIT_DATA
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data (train, rank 0, worker 0): 6 of 6 samples")
    assert "corrupt_image: sample '0000000000' of " in lines[0] and "does not decode (not an image format" in lines[0]
    assert "Caught" not in lines[0] and "Traceback" not in lines[0]


def test_metrics_files_stay_valid_json_with_non_finite_values(tmp_path):
    from dalle2_decoder.tracking.loggers import ConsoleLogger

    logger = ConsoleLogger(tmp_path)
    logger.log({"train/loss/unet1": float("nan"), "grad": float("inf"), "low": -math.inf, "ok": 0.5}, step=10)

    def refuse(constant):
        raise AssertionError(f"bare {constant} in metrics.jsonl")

    (record,) = [
        json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert (
        record["train/loss/unet1"] == "nan"
        and record["grad"] == "inf"
        and record["low"] == "-inf"
        and record["ok"] == 0.5
    )


# --- command-line misuse and checkpoints ---------------------------------------------------------


def test_usage_errors_exit_2(capsys, world):
    for argv in (
        [],
        ["--config_file"],
        ["--config_file", "x.json", "--set", "train.lr"],
        ["--config_file", "x", "--chek"],
    ):
        with pytest.raises(SystemExit) as caught:
            cli.main(argv)
        assert caught.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "error:" in err


def test_bad_set_paths_are_one_line(capsys, world):
    path = world.tmp / "config.json"
    path.write_text(json.dumps(world.raw))
    assert cli.main(["--config_file", str(path), "--check", "--set", "decoder.unets[4].dim=8"]) == EXIT_CONFIG
    assert_reported(EXIT_CONFIG, capsys.readouterr().err, EXIT_CONFIG, ["--set decoder.unets[4].dim", "no index 4"])


def test_debug_shows_the_traceback_and_a_bug_always_does(capsys, monkeypatch, world):
    raw = set_path(copy.deepcopy(world.raw), "seed", -1)
    path = world.tmp / "config.json"
    path.write_text(json.dumps(raw))
    assert cli.main(["--config_file", str(path), "--debug"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "Traceback" in err and "seed: must be in 0..4294967295" in err
    monkeypatch.setattr(cli, "train", lambda config, stop=None: 1 / 0)
    path.write_text(json.dumps(world.raw))
    assert cli.main(["--config_file", str(path)]) == EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and "a bug in dalle2-decoder" in err


def _torch_file(content) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        path = folder / "file.pth"
        torch.save(content, path)
        return path

    return write


EVALUATE_CASES = [
    # the checkpoint argument is checked before the config is read or a model is built
    ("folder", lambda folder: folder, EXIT_CHECKPOINT, ["--checkpoint", "is a folder"]),
    ("missing", lambda folder: folder / "gone.pth", EXIT_CHECKPOINT, ["--checkpoint", "gone.pth", "not found"]),
    (
        "empty",
        lambda folder: (folder / "e.pth", (folder / "e.pth").write_bytes(b""))[0],
        EXIT_CHECKPOINT,
        ["--checkpoint", "e.pth", "is empty"],
    ),
    (
        "text-file",
        lambda folder: (folder / "n.pth", (folder / "n.pth").write_text("notes " * 50))[0],
        EXIT_CHECKPOINT,
        ["--checkpoint", "n.pth", "not a checkpoint"],
    ),
    # a file torch reads, but not one of ours (KeyError 101 / KeyError 'trainer' before): one line naming it
    ("format-tag-without-state", _torch_file({"format": CHECKPOINT_FORMAT, "step": 3}), EXIT_CHECKPOINT, ["file.pth"]),
    (
        "format-tag-without-trainer",
        _torch_file({"format": CHECKPOINT_FORMAT, "step": 3, "state": {}}),
        EXIT_CHECKPOINT,
        ["file.pth", "trainer"],
    ),
    ("model-tag-without-model", _torch_file({"format": MODEL_FORMAT, "step": 3}), EXIT_CHECKPOINT, ["file.pth"]),
    ("unknown-format-tag", _torch_file({"format": "something/9", "step": 3}), EXIT_CHECKPOINT, ["file.pth"]),
    ("not-a-state-dict", _torch_file([1, 2, 3]), EXIT_CHECKPOINT, ["file.pth"]),
    ("empty-dict", _torch_file({}), EXIT_CHECKPOINT, ["file.pth"]),
]


@pytest.mark.parametrize("name, make, code, needles", EVALUATE_CASES, ids=[case[0] for case in EVALUATE_CASES])
def test_evaluate_reports_bad_checkpoints_in_one_line(capsys, monkeypatch, world, name, make, code, needles):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # so the CPU note would be printed
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    raw = copy.deepcopy(world.raw)
    raw["evaluate"] = {
        "n_evaluation_samples": 4,
        "KID": {"subset_size": 2, "feature": str(world.tmp / "no-weights.pt")},
    }
    config = world.tmp / "config.json"
    config.write_text(json.dumps(raw))
    checkpoint = make(world.tmp)
    code_seen = evaluate_main(["--config_file", str(config), "--checkpoint", str(checkpoint)])
    err = capsys.readouterr().err
    assert_reported(code_seen, err, code, needles)
    assert "CPU training" not in err  # evaluation is not training
    if name.startswith(("format-tag", "model-tag")):  # these get as far as the accelerator
        assert "note: CPU evaluation with" in err


TRAINING_CHECKPOINT_CASES = [
    c
    for c in EVALUATE_CASES
    if c[0] in ("format-tag-without-state", "format-tag-without-trainer", "model-tag-without-model", "not-a-state-dict")
]


@pytest.mark.parametrize(
    "name, make, code, needles", TRAINING_CHECKPOINT_CASES, ids=[case[0] for case in TRAINING_CHECKPOINT_CASES]
)
def test_training_reports_bad_checkpoints_in_one_line(capsys, monkeypatch, world, name, make, code, needles):
    """Files torch reads that are not checkpoints of this package: one line naming the file, exit 4.

    (The messages come from `tracking.checkpoint`; this pins that training reports them so.)"""
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    raw = copy.deepcopy(world.raw)
    raw["tracker"]["load"] = {"load_from": "local", "file_path": str(make(world.tmp))}
    config = world.tmp / "config.json"
    config.write_text(json.dumps(raw))
    code_seen = cli.main(["--config_file", str(config)])
    captured = capsys.readouterr()
    assert_reported(code_seen, captured.err, code, needles[:1], out=captured.out)
    assert "training finished" not in captured.out


def test_evaluate_misuse(capsys, world):
    config = world.tmp / "config.json"
    config.write_text(json.dumps(world.raw))
    (world.tmp / "ok.pth").write_bytes(b"PK\x03\x04" + b"\x00" * 60)
    code = evaluate_main(["--config_file", str(config), "--checkpoint", str(world.tmp / "ok.pth"), "--n_samples", "0"])
    assert_reported(code, capsys.readouterr().err, EXIT_USAGE, ["--n_samples", "at least 1"])
    # The fidelity metric is computed by default; with it off too, nothing is left to compute.
    config.write_text(json.dumps({**world.raw, "evaluate": {"fidelity": {"enabled": False}}}))
    code = evaluate_main(["--config_file", str(config), "--checkpoint", str(world.tmp / "ok.pth")])
    assert_reported(code, capsys.readouterr().err, EXIT_CONFIG, ["config.json", "enables no metric"])
    raw = set_path(copy.deepcopy(world.raw), "train.device", _cuda_device())
    raw["evaluate"] = {"KID": {"subset_size": 2}}
    config.write_text(json.dumps(raw))
    code = evaluate_main(["--config_file", str(config), "--checkpoint", str(world.tmp / "ok.pth")])
    err = capsys.readouterr().err
    assert_reported(code, err, EXIT_IO, ["train.device"])
    assert "CPU training" not in err


PREPARE_CASES = [
    (
        "images-missing",
        lambda tmp: ["--images", "/nonexistent/pictures", "--out", str(tmp / "out")],
        ["--images", "/nonexistent/pictures", "not found"],
    ),
    (
        "images-is-a-file",
        lambda tmp: ["--images", str(tmp / "config.json"), "--out", str(tmp / "out")],
        ["--images", "is a file"],
    ),
    (
        "no-images",
        lambda tmp: ["--images", str(tmp / "run-empty"), "--out", str(tmp / "out")],
        ["--images", "no image"],
    ),
    (
        "out-is-a-file",
        lambda tmp: ["--images", str(tmp / "pics"), "--out", str(tmp / "config.json")],
        ["--out", "not a folder"],
    ),
    (
        "shard-size-zero",
        lambda tmp: ["--images", str(tmp / "pics"), "--out", str(tmp / "o"), "--shard-size", "0"],
        ["--shard-size", "at least 1"],
    ),
    (
        "shard-size-vs-index",
        lambda tmp: ["--images", str(tmp / "pics"), "--out", str(tmp / "o"), "--shard-size", "20000"],
        ["--shard-size", "--index-width 4"],
    ),
    (
        "weights-missing",
        lambda tmp: [
            "--images",
            str(tmp / "pics"),
            "--out",
            str(tmp / "o"),
            "--clip-weights",
            str(tmp / "ViT-L-14.pt"),
        ],
        ["--clip-weights", "ViT-L-14.pt"],
    ),
]


@pytest.mark.parametrize("name, argv, needles", PREPARE_CASES, ids=[case[0] for case in PREPARE_CASES])
def test_prepare_checks_its_arguments_before_loading_clip(capsys, monkeypatch, world, name, argv, needles):
    from dalle2_decoder.data import prepare

    (world.tmp / "config.json").write_text("{}")
    (world.tmp / "run-empty").mkdir()
    (world.tmp / "pics").mkdir()
    (world.tmp / "pics" / "a.png").write_bytes(odd_image(8, 8))
    monkeypatch.setattr(
        prepare, "load_clip_embedder", lambda *args: pytest.fail("CLIP loaded before the arguments were checked")
    )
    assert_reported(prepare.main(argv(world.tmp)), capsys.readouterr().err, EXIT_USAGE, needles)


# --- real commands (subprocesses) ----------------------------------------------------------------


def run_command(args: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)


@pytest.mark.slow
def test_real_commands_report_one_line(world):
    config = world.tmp / "config.json"
    config.write_text(json.dumps(set_path(copy.deepcopy(world.raw), "seed", 2**70)))
    scripts = sysconfig.get_path("scripts")
    train = run_command([sys.executable, str(REPO_ROOT / "train_decoder.py"), "--config_file", str(config)])
    assert_reported(train.returncode, train.stderr, EXIT_CONFIG, ["seed:", str(2**70)], out=train.stdout)
    (world.tmp / "notes.pth").write_text("just some text, not a checkpoint\n")
    evaluate = run_command(
        [
            os.path.join(scripts, "dalle2-evaluate-decoder"),
            "--config_file",
            str(config),
            "--checkpoint",
            str(world.tmp / "notes.pth"),
        ]
    )
    assert_reported(
        evaluate.returncode, evaluate.stderr, EXIT_CHECKPOINT, ["--checkpoint", "notes.pth"], out=evaluate.stdout
    )
    prepare = run_command(
        [
            sys.executable,
            "-m",
            "dalle2_decoder.data.prepare",
            "--images",
            "/nonexistent",
            "--out",
            str(world.tmp / "out"),
        ]
    )
    assert_reported(prepare.returncode, prepare.stderr, EXIT_USAGE, ["--images", "/nonexistent"], out=prepare.stdout)


@pytest.mark.slow
def test_training_on_wholly_bad_data_is_one_line(world):
    shards = sorted((world.data / "shards").glob("*.tar"))
    for shard in shards:  # every image replaced by bytes that do not decode, same sizes
        with tarfile.open(shard) as archive:
            members = [(info, archive.extractfile(info).read()) for info in archive.getmembers()]
        with tarfile.open(shard, "w") as archive:
            for info, data in members:
                if info.name.endswith(".jpg"):
                    data = b"\x00" * len(data)
                archive.addfile(info, io.BytesIO(data))
    config = world.tmp / "config.json"
    config.write_text(json.dumps(world.raw))
    result = run_command([sys.executable, str(REPO_ROOT / "train_decoder.py"), "--config_file", str(config)])
    assert result.returncode == EXIT_DATA, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "corrupt_image" in errors[0] and "Traceback" not in result.stderr
    assert "Caught BadDataError" not in result.stderr
    assert not (world.tmp / "run" / "latest.pth").exists()


def _isolated(script: str) -> List[str]:
    """A shell script run with a mount namespace of its own (as root, or as a mapped root)."""
    return ["unshare", "-m", "sh", "-c", script] if os.geteuid() == 0 else ["unshare", "-rm", "sh", "-c", script]


@pytest.mark.slow
def test_read_only_and_full_filesystems_are_found_at_start(world):
    readonly, full = world.tmp / "readonly", world.tmp / "full"
    readonly.mkdir()
    full.mkdir()
    configs = {}
    for name, change in {
        "data_path_readonly": lambda raw: set_path(raw, "tracker.data_path", str(readonly / "run")),
        "save_readonly": lambda raw: set_path(raw, "tracker.save[0].save_latest_to", str(readonly / "latest.pth")),
        "data_path_full": lambda raw: set_path(raw, "tracker.data_path", str(full / "run")),
    }.items():
        path = world.tmp / f"{name}.json"
        path.write_text(json.dumps(change(copy.deepcopy(world.raw))))
        configs[name] = str(path)
    jobs = [
        {"command": "train", "argv": ["--config_file", configs["data_path_readonly"], "--check"]},
        {"command": "train", "argv": ["--config_file", configs["save_readonly"], "--check"]},
        {"command": "train", "argv": ["--config_file", configs["data_path_full"], "--check"]},
        {"command": "train", "argv": ["--config_file", configs["save_readonly"]]},  # training: stops at start
        {"command": "prepare", "argv": ["--images", str(world.data), "--out", str(readonly / "out")]},
        {"command": "torch_save", "path": str(full / "big.pt"), "bytes": 1 << 20, "write_paths": [str(full)]},
    ]
    (world.tmp / "jobs.json").write_text(json.dumps(jobs))
    script = (
        f"mount -t tmpfs -o size=64k tmpfs {readonly} && mount -o remount,ro {readonly} && "
        f"mount -t tmpfs -o size=96k tmpfs {full} && "
        f"exec {sys.executable} -m tests.bad_input_driver {world.tmp / 'jobs.json'}"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(_isolated(script), capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=env)
    assert result.returncode == 0, result.stderr
    ro_check, save_check, full_check, ro_train, ro_prepare, full_save = json.loads(result.stdout.splitlines()[-1])
    assert_reported(
        ro_check["code"],
        ro_check["err"],
        EXIT_IO,
        ["tracker.data_path", str(readonly / "run"), "not writable", "Read-only file system"],
    )
    assert_reported(
        save_check["code"],
        save_check["err"],
        EXIT_IO,
        ["tracker.save[0].save_latest_to", str(readonly), "Read-only file system"],
    )
    assert_reported(full_check["code"], full_check["err"], EXIT_IO, ["no space left for a checkpoint", str(full)])
    assert_reported(ro_train["code"], ro_train["err"], EXIT_IO, ["tracker.save[0].save_latest_to", "Read-only"])
    assert "dalle2-decoder training" not in ro_train["out"]  # not a single step was trained
    assert_reported(ro_prepare["code"], ro_prepare["err"], EXIT_USAGE, ["--out", "Read-only file system"])
    assert_reported(full_save["code"], full_save["err"], EXIT_IO, ["no space left on device", str(full)])


@pytest.mark.parametrize(
    "error, code, needles",
    [
        (
            OSError(28, "No space left on device", "/scratch/run/.staging/checkpoint.pt"),
            EXIT_IO,
            ["no space left on device", "/scratch/run/.staging/checkpoint.pt"],
        ),
        (OSError(30, "Read-only file system", "/ro/latest.pth"), EXIT_IO, ["/ro/latest.pth", "read-only file system"]),
        (PermissionError(13, "Permission denied", "/root/run"), EXIT_IO, ["/root/run", "permission denied"]),
        (KeyboardInterrupt(), 130, ["interrupted"]),
    ],
)
def test_the_reporter_names_the_path_of_io_errors(error, code, needles):
    stream = io.StringIO()
    try:  # raised for real, so it has a traceback to leave out
        if isinstance(error, KeyboardInterrupt):
            raise error
        raise RuntimeError("saving failed") from error  # as a library may wrap it
    except BaseException as raised:  # noqa: B902
        assert report(raised, stream=stream) == code
    assert_reported(code, stream.getvalue(), code, needles)
