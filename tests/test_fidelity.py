"""The decoder fidelity metric: paired RMSE (full and coarse) and CLIP similarity, their formulas on
hand-built images, their pooling over batches and processes, and their logging by a training run's
evaluation and by the evaluation command."""

from __future__ import annotations

import copy
import json
import math
import subprocess

import pytest
import torch

from dalle2_decoder.clip import create_clip
from dalle2_decoder.config import ClipConfig, TrainDecoderConfig
from dalle2_decoder.evaluate import main as evaluate_main
from dalle2_decoder.evaluation import MetricSuite, clip_similarity, paired_errors
from dalle2_decoder.evaluation.metrics import to_uint8
from dalle2_decoder.training import TrainingRun, main

from .clip_fixtures import TINY_EMBED_DIM, write_tiny_open_clip
from .conftest import REPO_ROOT, child_env, cpu_launch_command
from .fidelity_fixtures import IMAGE_SIZE, fixed_batch
from .numerics import FEW_ROUNDINGS, NETWORK, assert_close_to_scale
from .training_fixtures import EMBED_DIM, tiny_config, write_tiny_demo

PAIRED = ("eval/paired_rmse", "eval/paired_rmse_coarse")

# Pixel values are at most 1: every paired error below is a few roundings of values of that scale
# (a shifted pixel minus its original is exact only up to the rounding of the shift's addition).
PIXEL_SCALE = 1.0

CLIP_ULPS = NETWORK * math.sqrt(TINY_EMBED_DIM)
"""CLIP similarity computed on other batches: each embedding component moves by up to NETWORK ulps of
its scale (1, a unit vector's), and a cosine with a unit vector moves by at most the norm of that
change, sqrt(dim) times its largest component."""


def checkerboard(size: int) -> torch.Tensor:
    """+1 / -1 on alternate pixels, (size, size)."""
    index = torch.arange(size)
    return ((index[:, None] + index[None, :]) % 2) * 2.0 - 1.0


# --- the formulas --------------------------------------------------------------------------------


def test_a_constant_shift_is_the_error_at_both_scales():
    generator = torch.Generator().manual_seed(0)
    targets = 0.2 + 0.5 * torch.rand(3, 3, 32, 32, generator=generator)
    shifts = torch.tensor([0.1, -0.05, 0.25])
    errors = paired_errors(targets + shifts.view(3, 1, 1, 1), targets)
    assert set(errors) == {"paired_rmse", "paired_rmse_coarse"}
    for key, values in errors.items():
        assert values.shape == (3,), key
        assert_close_to_scale(values, shifts.abs(), ulps_of_scale=FEW_ROUNDINGS, scale=PIXEL_SCALE, what=key)


def test_texture_around_the_right_colour_has_no_coarse_error():
    # A checkerboard of amplitude a around each channel's true colour: every 4x4 block of a 32px image
    # (8x8 coarse) averages to that colour, while every pixel is a away from it.
    means = torch.tensor([0.3, 0.5, 0.65]).view(1, 3, 1, 1)
    amplitude = 0.2
    samples = means + amplitude * checkerboard(32).expand(2, 3, 32, 32)
    targets = means.expand(2, 3, 32, 32)
    errors = paired_errors(samples, targets, coarse_size=8)
    assert_close_to_scale(errors["paired_rmse"], torch.full((2,), amplitude), ulps_of_scale=FEW_ROUNDINGS, scale=1.0)
    assert_close_to_scale(errors["paired_rmse_coarse"], torch.zeros(2), ulps_of_scale=FEW_ROUNDINGS, scale=1.0)


def test_colour_and_layout_count_fully_at_the_coarse_scale():
    # Images constant on each coarse block (4x4 pixels of 32): averaging keeps every pixel, so the
    # coarse error is the full one, that of the 8x8 block colours.
    generator = torch.Generator().manual_seed(1)
    blocks_a, blocks_b = torch.rand(2, 2, 3, 8, 8, generator=generator).double()
    samples = blocks_a.repeat_interleave(4, dim=-1).repeat_interleave(4, dim=-2)
    targets = blocks_b.repeat_interleave(4, dim=-1).repeat_interleave(4, dim=-2)
    expected = (blocks_a - blocks_b).square().mean(dim=(1, 2, 3)).sqrt()
    errors = paired_errors(samples, targets, coarse_size=8)
    for key in ("paired_rmse", "paired_rmse_coarse"):
        assert_close_to_scale(errors[key], expected, ulps_of_scale=FEW_ROUNDINGS, scale=PIXEL_SCALE, what=key)


def test_targets_of_another_size_are_brought_to_the_samples_size():
    colours = torch.tensor([[0.2, 0.4, 0.9], [0.7, 0.1, 0.5]]).view(2, 3, 1, 1)
    samples = torch.full((2, 3, 16, 16), 0.5)
    targets = colours.expand(2, 3, 64, 64)  # true images at 4x the sampled size
    expected = (colours.view(2, 3) - 0.5).square().mean(dim=1).sqrt()
    errors = paired_errors(samples, targets, coarse_size=4)
    for key in ("paired_rmse", "paired_rmse_coarse"):
        assert_close_to_scale(errors[key], expected, ulps_of_scale=FEW_ROUNDINGS, scale=PIXEL_SCALE, what=key)


def test_images_smaller_than_the_coarse_size_are_compared_as_they_are():
    generator = torch.Generator().manual_seed(2)
    samples, targets = torch.rand(2, 2, 3, 6, 6, generator=generator)  # 6 pixels do not divide into 8
    errors = paired_errors(samples, targets, coarse_size=8)
    assert torch.equal(errors["paired_rmse_coarse"], errors["paired_rmse"])


def test_mismatched_batches_are_refused():
    with pytest.raises(ValueError, match="same size and channels"):
        paired_errors(torch.zeros(2, 3, 8, 8), torch.zeros(3, 3, 8, 8))


# --- CLIP similarity -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    return write_tiny_open_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def clip(clip_model):
    return create_clip(ClipConfig(make="open_clip", model=clip_model))


@pytest.mark.usefixtures("compute_threads")
def test_a_sample_that_clip_sees_as_its_embedding_scores_one(clip):
    generator = torch.Generator().manual_seed(3)
    samples = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    embeddings = clip.embed_images(samples)
    # The same computation on the same batch gives the same embeddings: a cosine of a vector with itself.
    ones = torch.ones(4)
    assert_close_to_scale(clip_similarity(clip, samples, embeddings), ones, ulps_of_scale=FEW_ROUNDINGS)
    # Conditioning embeddings need not be normalised; the opposite direction scores -1.
    assert_close_to_scale(clip_similarity(clip, samples, 3.5 * embeddings), ones, ulps_of_scale=FEW_ROUNDINGS)
    assert_close_to_scale(clip_similarity(clip, samples, -0.5 * embeddings), -ones, ulps_of_scale=FEW_ROUNDINGS)
    # Any other embedding: the cosine with CLIP's (normalised) embedding of the sample.
    others = torch.randn(4, TINY_EMBED_DIM, generator=generator)
    expected = (embeddings.double() * others.double()).sum(-1) / others.double().norm(dim=-1)
    assert_close_to_scale(clip_similarity(clip, samples, others), expected, ulps_of_scale=FEW_ROUNDINGS, scale=1.0)


def test_embeddings_of_another_clip_are_refused(clip):
    with pytest.raises(ValueError, match="give the CLIP that made them"):
        clip_similarity(clip, torch.rand(2, 3, 8, 8), torch.randn(2, TINY_EMBED_DIM + 1))


# --- pooling -------------------------------------------------------------------------------------


def expected_means(real, generated, embeddings, clip):
    """The means over all samples of the per-sample values, on the 8-bit images every metric sees."""
    real, generated = to_uint8(real).float() / 255, to_uint8(generated).float() / 255
    errors = paired_errors(generated, real)
    means = {f"eval/{key}": float(values.mean()) for key, values in errors.items()}
    if clip is not None:
        means["eval/clip_similarity"] = float(clip_similarity(clip, generated, embeddings).double().mean())
    return means


def assert_pooled(got, expected):
    for key, value in expected.items():
        # paired errors: float64 per-sample values (below float32 rounding); CLIP: batches of other sizes
        ulps = CLIP_ULPS if key == "eval/clip_similarity" else FEW_ROUNDINGS
        assert_close_to_scale(got[key], value, ulps_of_scale=ulps, scale=1.0, what=key)


@pytest.mark.usefixtures("compute_threads")
def test_batches_pool_to_the_mean_over_all_samples(clip):
    real, generated, embeddings = fixed_batch(10, TINY_EMBED_DIM)
    suite = MetricSuite({}, device=torch.device("cpu"), image_size=IMAGE_SIZE, fidelity=True, clip=clip)
    for part in (slice(0, 7), slice(7, 10)):  # unequal batches: a mean of batch means would differ
        suite.update(real[part], generated[part], embeddings[part])
    values = suite.compute()
    assert set(values) == {*PAIRED, "eval/clip_similarity"}
    assert_pooled(values, expected_means(real, generated, embeddings, clip))
    # Without a CLIP (or without embeddings) only the paired errors.
    suite = MetricSuite({}, device=torch.device("cpu"), image_size=IMAGE_SIZE, fidelity=True)
    suite.update(real, generated, embeddings)
    assert set(suite.compute()) == set(PAIRED)


@pytest.mark.slow
@pytest.mark.usefixtures("compute_threads")
def test_two_processes_compute_the_fidelity_of_the_pooled_samples(clip_model, clip, tmp_path):
    count = 21
    out = tmp_path / "values.json"
    command = cpu_launch_command(str(REPO_ROOT / "tests" / "fidelity_fixtures.py"), str(out), clip_model, str(count))
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=child_env())
    assert result.returncode == 0, result.stdout + result.stderr
    two = json.loads(out.read_text())
    assert two["world_size"] == 2 and two["distributed"] is True and two["samples"] == count

    real, generated, embeddings = fixed_batch(count, TINY_EMBED_DIM)
    one = MetricSuite({}, device=torch.device("cpu"), image_size=IMAGE_SIZE, fidelity=True, clip=clip)
    one.update(real, generated, embeddings)  # one process, one batch
    one_values = one.compute()
    assert set(one_values) == {*PAIRED, "eval/clip_similarity"}
    assert_pooled(two, one_values)
    # Not the average of the two ranks' means (13 and 8 samples).
    halves = [
        expected_means(real[part], generated[part], embeddings[part], clip) for part in (slice(0, 13), slice(13, count))
    ]
    for key in PAIRED:
        assert abs(two[key] - (halves[0][key] + halves[1][key]) / 2) > 1e-3, key


# --- in a training run and in the evaluation command ---------------------------------------------


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_tiny_demo(tmp_path_factory.mktemp("demo"))


def fidelity_config(demo_data, data_path, **evaluate):
    config = tiny_config(demo_data, data_path, epochs=1, epoch_samples=8)
    config["decoder"]["sample_timesteps"] = 2  # keeps sampling cheap on busy CPUs
    config["data"]["splits"] = {"train": 0.5, "val": 0.17, "test": 0.33}  # 3 / 1 / 2 shards of 16
    config["evaluate"] = {"n_evaluation_samples": 6, "fidelity": {"enabled": True, **evaluate}}
    return config


def logged_evaluations(data_path):
    lines = [json.loads(line) for line in (data_path / "metrics.jsonl").read_text().splitlines()]
    return [line.get("metrics", line) for line in lines if "eval/samples" in json.dumps(line)]


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    """One epoch with the fidelity metrics as the only evaluation; the data carries its embeddings, no CLIP."""
    data_path = tmp_path_factory.mktemp("run")
    raw = fidelity_config(demo_data, data_path)
    assert main(TrainDecoderConfig.from_dict(raw)) == 0
    return raw, data_path


def test_without_other_metrics_a_run_samples_for_fidelity_only_when_asked(demo_data, tmp_path):
    raw = tiny_config(demo_data, tmp_path / "run")
    assert not TrainDecoderConfig.from_dict(raw).evaluate.in_training()  # the reference's run: no evaluate phase
    raw["evaluate"] = {"fidelity": {"enabled": True}}
    assert TrainDecoderConfig.from_dict(raw).evaluate.in_training()


@pytest.mark.slow
def test_the_evaluation_of_a_run_logs_the_paired_errors(trained):
    _, data_path = trained
    evaluations = logged_evaluations(data_path)
    assert len(evaluations) == 1
    values = evaluations[0]
    assert values["eval/samples"] == 6
    assert "eval/clip_similarity" not in values  # no CLIP: the data's embeddings came precomputed
    # Block means of 2x2 pixels (16px to 8px): by Jensen the coarse error is at most the full one.
    assert 0 < values["eval/paired_rmse_coarse"] <= values["eval/paired_rmse"] <= 1


@pytest.mark.slow
@pytest.mark.usefixtures("compute_threads")
def test_each_generated_image_is_compared_with_its_own_true_image(demo_data, tmp_path, capsys):
    run = TrainingRun(TrainDecoderConfig.from_dict(fidelity_config(demo_data, tmp_path / "run")))
    values = run.evaluate()
    second = run.evaluate()
    assert all(second[key] == values[key] for key in PAIRED)  # the same samples and noise every evaluation
    # No CLIP for these precomputed embeddings: said once over the run's evaluations, not an error.
    assert capsys.readouterr().out.count("eval/clip_similarity is not computed") == 1
    # The same 6 validation samples and sampling seeds as the evaluation (batches of 4 and 2; seeds
    # seed + batch index on one process), generated here and scored image by image.
    loader, seed = run.evaluator.loader, run.config.seed
    loader.set_epoch(0)
    real, generated = [], []
    with run.trainer.sampling_weights() as decoder, torch.no_grad():
        for index, batch in zip(range(2), loader):
            batch = run.batches.prepare({key: value[: 4 if index == 0 else 2] for key, value in batch.items()})
            real.append(batch["image"])
            generated.append(decoder.sample(image_embed=batch["image_embed"], seed=seed + index))
    real, generated = torch.cat(real), torch.cat(generated)
    # Same process, thread count and batches: the images are those the evaluation generated.
    assert_pooled(values, expected_means(real, generated, None, None))
    # Paired with another sample's true image, the error differs.
    mismatched = expected_means(real.roll(1, 0), generated, None, None)
    assert abs(mismatched["eval/paired_rmse"] - values["eval/paired_rmse"]) > 1e-4
    run.tracker.finish()


@pytest.mark.slow
def test_a_run_with_decoder_clip_logs_clip_similarity_with_that_clip(demo_data, clip_model, tmp_path):
    data = copy.deepcopy(demo_data)
    data.pop("img_embeddings_url")  # shards with images only: decoder.clip embeds them
    data.pop("text_embeddings_url")
    raw = fidelity_config(data, tmp_path / "run")
    raw["decoder"]["unets"][0]["image_embed_dim"] = TINY_EMBED_DIM
    raw["decoder"]["clip"] = {"make": "open_clip", "model": clip_model}
    run = TrainingRun(TrainDecoderConfig.from_dict(raw))
    assert run.evaluator.suite.metrics["fidelity"].clip is run.batches.clip  # one CLIP, loaded once
    assert run.execute() == 0
    (values,) = logged_evaluations(tmp_path / "run")
    assert -1 <= values["eval/clip_similarity"] <= 1 and set(PAIRED) <= set(values)


@pytest.mark.slow
@pytest.mark.usefixtures("compute_threads")
def test_scoring_with_a_clip_leaves_the_training_of_the_run_as_it_was(demo_data, tmp_path):
    """Loading a CLIP initialises its layers at random before its weights load, and so would move the
    random stream the run draws its noise from: the same run with and without `evaluate.fidelity.clip`
    must train the same weights and log the same losses."""
    from dalle2_decoder.tracking import read_file

    clip_folder = write_tiny_open_clip(tmp_path / "clip", embed_dim=EMBED_DIM)
    not_compared = {"time", "train/samples_per_s", "eval/seconds", "eval/clip_similarity"}
    runs = {}
    for name, evaluate in (("paired only", {}), ("with a CLIP", {"clip": {"make": "open_clip", "model": clip_folder}})):
        data_path = tmp_path / name.replace(" ", "_")
        assert main(TrainDecoderConfig.from_dict(fidelity_config(demo_data, data_path, **evaluate))) == 0
        lines = [json.loads(line) for line in (data_path / "metrics.jsonl").read_text().splitlines()]
        (scores,) = logged_evaluations(data_path)
        # Every logged value but the machine's timings and the CLIP's own score: losses, paired errors.
        logged = [{key: value for key, value in line.items() if key not in not_compared} for line in lines]
        runs[name] = read_file(data_path / "latest.pth").state["trainer"]["decoder"], logged, scores
    (plain, plain_logged, plain_scores), (scored, scored_logged, scored_scores) = runs.values()
    assert "eval/clip_similarity" in scored_scores and "eval/clip_similarity" not in plain_scores
    # The same process, thread count and arithmetic: exactly the same, or the streams moved.
    assert [name for name in plain if not torch.equal(plain[name], scored[name])] == []
    assert plain_logged == scored_logged and any("val/loss/unet1" in line for line in plain_logged)
    assert all(plain_scores[key] == scored_scores[key] for key in PAIRED)


@pytest.mark.slow
@pytest.mark.usefixtures("compute_threads")
def test_the_command_computes_fidelity_with_a_clip_given_to_it(trained, tmp_path, capsys, write_config):
    raw, data_path = trained
    config_path = write_config(raw)
    argv = ["--config_file", str(config_path), "--checkpoint", str(data_path / "latest.pth"), "--n_samples", "5"]
    assert evaluate_main(argv) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert set(PAIRED) <= set(printed) and printed["eval/samples"] == 5 and "eval/clip_similarity" not in printed
    assert captured.err.count("eval/clip_similarity is not computed") == 1  # said once, not an error

    clip_32 = write_tiny_open_clip(tmp_path / "clip32", embed_dim=EMBED_DIM)  # the data's embedding size
    assert evaluate_main(argv + ["--clip_make", "open_clip", "--clip_model", clip_32]) == 0
    with_clip = json.loads(capsys.readouterr().out)
    assert -1 <= with_clip["eval/clip_similarity"] <= 1
    for key in PAIRED:
        assert with_clip[key] == printed[key], key  # the same images: the CLIP changes nothing else

    # A CLIP of another embedding size cannot have made the data's embeddings: refused at start.
    clip_16 = write_tiny_open_clip(tmp_path / "clip16")
    assert evaluate_main(argv + ["--clip_make", "open_clip", "--clip_model", clip_16]) == 1
    err = capsys.readouterr().err
    assert "error: evaluate.fidelity.clip: gives 16-dimensional image embeddings" in err, err

    # With fidelity turned off and no other metric, there is nothing to compute.
    off = copy.deepcopy(raw)
    off["evaluate"]["fidelity"]["enabled"] = False
    assert evaluate_main(["--config_file", str(write_config(off)), *argv[2:]]) == 1
    assert "enables no metric" in capsys.readouterr().err


def test_a_bad_fidelity_option_names_its_path(demo_data, tmp_path, config_problems):
    raw = fidelity_config(demo_data, tmp_path / "run", coarse_size=0)
    raw["evaluate"]["fidelity"]["clip"] = {"make": "opnai"}
    problems = config_problems(raw)
    assert "evaluate.fidelity.coarse_size: must be at least 1 (got 0)" in problems
    assert any(problem.startswith('evaluate.fidelity.clip.make: unknown value "opnai"') for problem in problems)
