"""The evaluate phase inside a tiny training run, and the stand-alone command on its checkpoints."""

import json

import pytest

from dalle2_decoder.config import TrainDecoderConfig
from dalle2_decoder.evaluate import main as evaluate_main
from dalle2_decoder.training import TrainingRun, main

from .evaluation_fixtures import metric_options, write_networks
from .training_fixtures import tiny_config, write_tiny_demo

METRIC_KEYS = {
    "eval/FID",
    "eval/IS_mean",
    "eval/IS_std",
    "eval/KID_mean",
    "eval/KID_std",
    "eval/LPIPS",
    "eval/paired_rmse",  # the fidelity metrics come with every evaluation (no CLIP here: no clip_similarity)
    "eval/paired_rmse_coarse",
    "eval/samples",
    "eval/seconds",
}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_tiny_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    return write_networks(tmp_path_factory.mktemp("networks"))


def evaluating_config(demo_data, networks, data_path, n_samples=10, **train):
    config = tiny_config(demo_data, data_path, **train)
    config["decoder"]["sample_timesteps"] = 2  # keeps sampling cheap on busy CPUs
    config["data"]["splits"] = {"train": 0.5, "val": 0.17, "test": 0.33}  # 3 / 1 / 2 shards of 16
    config["evaluate"] = {"n_evaluation_samples": n_samples, **metric_options(networks, subset_size=4)}
    return config


@pytest.fixture(scope="module")
def trained(demo_data, networks, tmp_path_factory):
    """One epoch of training with every metric enabled."""
    data_path = tmp_path_factory.mktemp("run")
    raw = evaluating_config(demo_data, networks, data_path, epochs=1, epoch_samples=8)
    config = TrainDecoderConfig.from_dict(raw)
    assert main(config) == 0
    return raw, data_path


@pytest.mark.slow
def test_the_evaluate_phase_logs_every_metric_with_the_step(trained):
    _, data_path = trained
    lines = [json.loads(line) for line in (data_path / "metrics.jsonl").read_text().splitlines()]
    evaluations = [line for line in lines if "eval/FID" in json.dumps(line)]
    assert len(evaluations) == 1
    line = evaluations[0]
    values = line.get("metrics", line)
    assert METRIC_KEYS <= set(values), line
    assert line["samples_seen"] == 8  # at the end of the one epoch (the x-axis of every log)
    # 10 asked for, read in batches of 4 from a validation split of 16: exactly 10 images.
    assert values["eval/samples"] == 10
    assert values["eval/FID"] > 0 and values["eval/IS_mean"] >= 0.999 and values["eval/LPIPS"] > 0
    assert values["eval/seconds"] > 0


@pytest.mark.slow
def test_evaluation_is_reproducible_and_capped_by_the_split(demo_data, networks, tmp_path):
    config = TrainDecoderConfig.from_dict(evaluating_config(demo_data, networks, tmp_path / "run", n_samples=1000))
    run = TrainingRun(config)
    first, second = run.evaluate(), run.evaluate()
    assert first["eval/samples"] == 16  # the whole validation split (1 shard of 16), no repeats
    for key in METRIC_KEYS - {"eval/seconds"}:
        assert first[key] == second[key], key  # the same samples and the same noise at every evaluation
    run.tracker.finish()


def test_a_metric_that_cannot_be_built_fails_at_preparation(demo_data, networks, tmp_path):
    from dalle2_decoder.evaluation import EvaluationSetupError

    raw = evaluating_config(demo_data, networks, tmp_path / "run")
    raw["evaluate"]["LPIPS"]["net_type"] = str(tmp_path / "missing.pt")
    with pytest.raises(EvaluationSetupError, match=r"evaluate\.LPIPS\.net_type: .*missing\.pt does not exist"):
        TrainingRun(TrainDecoderConfig.from_dict(raw))  # built at setup, before any training
    assert not (tmp_path / "run" / "run_state.json").exists()  # and before the tracker starts a run


def test_no_metric_means_no_evaluation(demo_data, tmp_path):
    config = TrainDecoderConfig.from_dict(tiny_config(demo_data, tmp_path / "run"))
    run = TrainingRun(config)
    assert run.evaluate() == {}
    run.tracker.finish()


@pytest.mark.slow
@pytest.mark.usefixtures("compute_threads")  # one thread count for both evaluations: equal bit for bit
def test_the_command_evaluates_a_saved_checkpoint(trained, tmp_path, capsys, write_config):
    raw, data_path = trained
    config_path = write_config(raw)
    output = tmp_path / "metrics.jsonl"
    argv = [
        "--config_file",
        str(config_path),
        "--checkpoint",
        str(data_path / "latest.pth"),
        "--n_samples",
        "6",
        "--output",
        str(output),
    ]
    assert evaluate_main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["step"] == 8 and METRIC_KEYS <= set(printed) and printed["eval/samples"] == 6
    assert json.loads(output.read_text()) == printed
    # A model save evaluates the same (EMA) weights as the checkpoint's EMA.
    argv = ["--config_file", str(config_path), "--checkpoint", str(data_path / "model.safetensors"), "--n_samples", "6"]
    assert evaluate_main(argv) == 0
    from_model = json.loads(capsys.readouterr().out)
    for key in METRIC_KEYS - {"eval/seconds"}:
        assert from_model[key] == printed[key], key  # the same weights, samples and kernels: exactly
    # The trained (not averaged) weights differ from the EMA after a few steps.
    assert evaluate_main(argv[:4] + ["--no_ema", "--checkpoint", str(data_path / "latest.pth")]) == 0
    assert json.loads(capsys.readouterr().out)["eval/FID"] != printed["eval/FID"]


def test_the_command_reports_problems_in_one_line(trained, tmp_path, capsys, write_config):
    raw, data_path = trained
    config_path = write_config(raw)
    assert evaluate_main(["--config_file", str(config_path), "--checkpoint", str(tmp_path / "none.pth")]) == 4
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: --checkpoint: checkpoint file not found: {tmp_path / 'none.pth'}"]
    no_metrics = dict(raw, evaluate={"fidelity": {"enabled": False}})
    assert (
        evaluate_main(["--config_file", str(write_config(no_metrics)), "--checkpoint", str(data_path / "latest.pth")])
        == 1
    )
    assert "enables no metric" in capsys.readouterr().err
    missing_network = json.loads(json.dumps(raw))
    missing_network["evaluate"]["FID"]["feature"] = str(tmp_path / "gone.pt")
    assert (
        evaluate_main(
            ["--config_file", str(write_config(missing_network)), "--checkpoint", str(data_path / "latest.pth")]
        )
        == 1
    )
    assert "error: evaluate.FID.feature: " in capsys.readouterr().err
