"""`dalle2-sample-decoder` end to end on the tiny demo data: input kinds, outputs, reproducibility, ranks, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle2_decoder.config import TrainDecoderConfig
from dalle2_decoder.config.decoder import SAMPLERS as CONFIG_SAMPLER_NAMES
from dalle2_decoder.models.samplers import SAMPLER_NAMES
from dalle2_decoder.sample import main
from dalle2_decoder.tracking import save_model

from .clip_fixtures import TINY_EMBED_DIM, write_tiny_open_clip
from .conftest import REPO_ROOT, cpu_launch_command
from .training_fixtures import EMBED_DIM, IMAGE_SIZE, tiny_config, write_tiny_demo


def make_model(root: Path, data, **unet_options) -> Path:
    """A model save of a tiny decoder (weights perturbed from their init so that inputs matter), config included."""
    raw = tiny_config(data, root / "run")
    raw["decoder"]["unets"][0].update(unet_options)
    raw["decoder"].update(samplers="dpmpp_2m", sample_timesteps=3)
    decoder = TrainDecoderConfig.from_dict(raw).decoder.create()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    path = root / "model.safetensors"
    save_model(path, decoder.state_dict(), step=7, config_json=json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    data = write_tiny_demo(root / "demo")
    model = make_model(root, data, cond_on_text_encodings=True, text_embed_dim=EMBED_DIM)
    embeds = np.random.default_rng(0).standard_normal((4, EMBED_DIM)).astype(np.float32)
    np.save(root / "embeds.npy", embeds)
    texts = np.random.default_rng(1).standard_normal((4, EMBED_DIM)).astype(np.float32)
    np.save(root / "texts.npy", texts)
    return {"root": root, "data": data, "model": model, "embeds": embeds}


def read_output(out: Path):
    summary = json.loads((out / "samples.json").read_text())
    images = {(e["input"], e["seed"]): np.asarray(Image.open(out / e["file"])) for e in summary["images"]}
    return summary, images


def assert_images_match(a, b):
    assert a.keys() == b.keys()
    for key in a:
        # Batches of other sizes may round differently in the last bits: at most one level of 255 apart.
        difference = np.abs(a[key].astype(int) - b[key].astype(int)).max()
        assert difference <= 1, (key, difference)


def test_sampler_names_in_the_config_are_the_samplers():
    assert tuple(CONFIG_SAMPLER_NAMES) == tuple(SAMPLER_NAMES)


@pytest.mark.slow
def test_embeddings_with_text_give_a_png_per_input_and_seed_a_grid_and_the_record(setup, tmp_path):
    out = tmp_path / "out"
    code = main(
        [
            "--model",
            str(setup["model"]),
            "--embeddings",
            str(setup["root"] / "embeds.npy"),
            "--text_encodings",
            str(setup["root"] / "texts.npy"),
            "--seeds",
            "3",
            "5",
            "--batch_size",
            "3",
            "--cond_scale",
            "2.0",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    summary, images = read_output(out)
    assert summary["count"] == 8 and summary["inputs"] == "embeddings"
    first = summary["images"][0]
    assert first["input"] == "row0" and first["seed"] == 3 and first["sampler"] == ["dpmpp_2m"]
    assert first["steps"] == [3] and first["cond_scale"] == [2.0] and first["step"] == 7
    assert first["checkpoint"] == str(setup["model"]) and first["file"] == "images/00000_row0_seed3.png"
    assert all(image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) for image in images.values())
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * (IMAGE_SIZE + 2) + 2, 4 * (IMAGE_SIZE + 2) + 2)  # a row per input, a column per seed
    assert not np.array_equal(images[("row0", 3)], images[("row0", 5)])  # seeds differ
    assert not np.array_equal(images[("row0", 3)], images[("row1", 3)])  # inputs matter

    # Each image is the decoder's sample for that input and seed alone (whatever batch the command put it in).
    from dalle2_decoder import load_decoder

    decoder = load_decoder(setup["model"])
    texts = torch.from_numpy(np.load(setup["root"] / "texts.npy"))[:, None]
    for (name, seed), image in images.items():
        row = int(name[len("row") :])
        alone = decoder.sample(
            image_embed=torch.from_numpy(setup["embeds"][row : row + 1]),
            text_encodings=texts[row : row + 1],
            text_mask=torch.ones(1, 1, dtype=torch.bool),
            cond_scale=2.0,
            seed=[seed],
        )
        expected = (alone[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.abs(expected.astype(int) - image.astype(int)).max() <= 1, (name, seed)

    # Text encodings condition the result.
    plain = tmp_path / "plain"
    assert (
        main(
            [
                "--model",
                str(setup["model"]),
                "--embeddings",
                str(setup["root"] / "embeds.npy"),
                "--seeds",
                "3",
                "--cond_scale",
                "2.0",
                "--limit",
                "1",
                "--out",
                str(plain),
            ]
        )
        == 0
    )
    assert not np.array_equal(read_output(plain)[1][("row0", 3)], images[("row0", 3)])


def test_sampler_steps_and_stop_options_are_used_and_recorded(setup, tmp_path):
    out = tmp_path / "out"
    code = main(
        [
            "--model",
            str(setup["model"]),
            "--embeddings",
            str(setup["root"] / "embeds.npy"),
            "--limit",
            "2",
            "--num_per_input",
            "2",
            "--seed",
            "10",
            "--sampler",
            "ddim",
            "--steps",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    summary, images = read_output(out)
    assert sorted(images) == [("row0", 10), ("row0", 11), ("row1", 10), ("row1", 11)]
    assert summary["images"][0]["sampler"] == ["ddim"] and summary["images"][0]["steps"] == [4]


@pytest.mark.slow
def test_the_test_split_of_the_runs_data(setup, tmp_path):
    out = tmp_path / "out"
    assert main(["--model", str(setup["model"]), "--test_split", "--limit", "3", "--out", str(out)]) == 0
    summary, images = read_output(out)
    from dalle2_decoder.data import create_dataloaders

    config = TrainDecoderConfig.from_dict(json.loads(json.dumps(tiny_config(setup["data"], setup["root"] / "run"))))
    loader = create_dataloaders(config.data, seed=config.seed, validation_samples=None, test_samples=None)["test"]
    keys = [key for batch in loader for key in batch["key"]][:3]
    assert [entry["input"] for entry in summary["images"]] == keys and summary["inputs"] == "test_split"


@pytest.mark.slow
def test_a_folder_of_images_through_clip(setup, tmp_path):
    clip = write_tiny_open_clip(tmp_path / "clip")
    root = tmp_path / "clip_model"
    root.mkdir()
    data = dict(setup["data"])
    raw_model = make_model(root, data, image_embed_dim=TINY_EMBED_DIM)
    folder = tmp_path / "pictures"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for name in ("b_cat", "a_dog"):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    # The decoder's config has no decoder.clip: the command needs to be told which CLIP.
    assert main(["--model", str(raw_model), "--images", str(folder), "--out", str(out)]) == 2
    code = main(
        [
            "--model",
            str(raw_model),
            "--images",
            str(folder),
            "--clip_make",
            "open_clip",
            "--clip_model",
            clip,
            "--seeds",
            "0",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    summary, images = read_output(out)
    assert [entry["input"] for entry in summary["images"]] == ["a_dog", "b_cat"] and summary["inputs"] == "images"
    assert not np.array_equal(images[("a_dog", 0)], images[("b_cat", 0)])


def launch(tmp_path, *arguments):
    command = cpu_launch_command(*arguments)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)


@pytest.mark.slow
def test_two_processes_write_one_output_set_equal_to_one_process(setup, tmp_path):
    common = [
        "--model",
        str(setup["model"]),
        "--embeddings",
        str(setup["root"] / "embeds.npy"),
        "--text_encodings",
        str(setup["root"] / "texts.npy"),
        "--seeds",
        "1",
        "2",
        "--limit",
        "3",
    ]
    assert main(common + ["--batch_size", "4", "--out", str(tmp_path / "one")]) == 0
    result = launch(
        tmp_path, "-m", "dalle2_decoder.sample", *common, "--batch_size", "2", "--out", str(tmp_path / "two")
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.count("wrote 6 images") == 1  # only the main process writes
    assert "(images per process: [3, 3])" in result.stderr  # each process sampled its own half
    one, one_images = read_output(tmp_path / "one")
    two, two_images = read_output(tmp_path / "two")
    assert one["images"] == two["images"]  # the same (input, seed) list in the same order, no duplicates
    assert len({(e["input"], e["seed"]) for e in two["images"]}) == 6
    assert_images_match(one_images, two_images)
    assert sorted(p.name for p in (tmp_path / "two" / "images").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "images").iterdir()
    )


@pytest.mark.parametrize(
    "arguments, status, message",
    [
        (["--model", "MISSING/nothing.safetensors"], 4, "no such file or folder"),
        (["--sampler", "dpm"], 2, "--sampler dpm: unknown; choose one of ddpm, ddim"),
        (
            ["--steps", "0"],
            2,
            "--steps[0]: U-Net 1 samples with 0 steps; it must be between 1 and the decoder's timesteps (20)",
        ),
        (["--cond_scale", "1", "2"], 2, "--cond_scale has 2 values but the decoder has 1 U-Nets"),
        (["--stop_at_unet", "2"], 2, "--stop_at_unet 2: the decoder has U-Nets 1..1"),
        (["--seeds", "1", "1"], 2, "--seeds repeats a seed"),
    ],
)
def test_bad_options_fail_with_one_line(setup, tmp_path, capsys, arguments, status, message):
    # a repeated option takes its last value, so `arguments` may replace the model too
    argv = [
        "--model",
        str(setup["model"]),
        "--embeddings",
        str(setup["root"] / "embeds.npy"),
        "--out",
        str(tmp_path / "out"),
        *arguments,
    ]
    assert main(argv) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bad_embeddings_file_and_the_module_entry_point(setup, tmp_path):
    np.save(tmp_path / "wrong.npy", np.zeros((2, 5), np.float32))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dalle2_decoder.sample",
            "--model",
            str(setup["model"]),
            "--embeddings",
            str(tmp_path / "wrong.npy"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=600,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --embeddings: {tmp_path / 'wrong.npy'} has shape (2, 5); the decoder takes (N, {EMBED_DIM})"
    )
    assert "Traceback" not in result.stderr
