"""Two processes (gloo on the CPU) give the same metric values as one process on the same samples."""

import json
import subprocess

import pytest
import torch

from dalle2_decoder.evaluation import MetricSuite

from .conftest import REPO_ROOT, child_env, cpu_launch_command
from .evaluation_fixtures import (
    IMAGE_SIZE,
    assert_metrics_close,
    fixed_images,
    metric_options,
    metric_scales,
    write_networks,
)
from .training_fixtures import tiny_config, write_tiny_demo

COUNT = 21


def launch(tmp_path, *arguments):
    command = cpu_launch_command(*arguments)
    # each rank with the tests' thread count (make test-portability varies it)
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=child_env())


@pytest.mark.slow
def test_two_processes_compute_the_metrics_of_the_pooled_samples(tmp_path):
    networks = write_networks(tmp_path / "networks")
    out = tmp_path / "values.json"
    # Rank 0 takes 13 images in batches of 4, rank 1 takes 8 in batches of 3.
    result = launch(
        tmp_path, str(REPO_ROOT / "tests" / "evaluation_fixtures.py"), str(out), json.dumps(networks), str(COUNT)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    two = json.loads(out.read_text())
    assert two["world_size"] == 2 and two["distributed"] is True and two["samples"] == COUNT

    suite = MetricSuite(metric_options(networks), device=torch.device("cpu"), image_size=IMAGE_SIZE)
    real, generated = fixed_images(COUNT)
    suite.update(real, generated)  # one process, one batch
    one = suite.compute(seed=3)
    assert set(one) == {"eval/FID", "eval/IS_mean", "eval/IS_std", "eval/KID_mean", "eval/KID_std", "eval/LPIPS"}
    assert_metrics_close(two, one, metric_scales(networks, real, generated))

    # Each half alone gives other values: the two-process value is not an average of per-rank values.
    halves = []
    for part in (slice(0, 13), slice(13, COUNT)):
        suite.reset()
        suite.update(real[part], generated[part])
        halves.append(suite.compute(seed=3)["eval/FID"])
    assert two["eval/FID"] != pytest.approx(sum(halves) / 2, rel=1e-3)


@pytest.mark.slow
def test_the_command_under_accelerate_launch_evaluates_on_both_ranks(tmp_path):
    data = write_tiny_demo(tmp_path / "demo")
    networks = write_networks(tmp_path / "networks")
    config = tiny_config(data, tmp_path / "run")
    config["decoder"]["sample_timesteps"] = 2
    config["evaluate"] = {"n_evaluation_samples": 12, **metric_options(networks, subset_size=4)}
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    from dalle2_decoder.config import TrainDecoderConfig

    decoder = TrainDecoderConfig.from_dict(config).decoder.create()
    from safetensors.torch import save_file

    save_file(
        {name: tensor.contiguous() for name, tensor in decoder.state_dict().items()},
        str(tmp_path / "model.safetensors"),
    )
    result = launch(
        tmp_path,
        "-m",
        "dalle2_decoder.evaluation",
        "--config_file",
        str(config_path),
        "--checkpoint",
        str(tmp_path / "model.safetensors"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # only the main process prints the result
    values = json.loads(lines[0])
    # 12 samples: 6 on each rank (batches of 4 then 2), all counted.
    assert values["eval/samples"] == 12 and values["eval/FID"] > 0 and "eval/KID_mean" in values
