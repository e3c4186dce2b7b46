"""The command line: --check prints the resolved config or every problem; --set overrides options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import pytest

from dalle2_decoder import cli
from dalle2_decoder.config import TrainDecoderConfig

from .conftest import REPO_ROOT


def run_main(capsys, *argv):
    code = cli.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_check_prints_the_resolved_config_with_every_default(capsys, minimal_config, write_config):
    code, out, err = run_main(capsys, "--config_file", write_config(minimal_config), "--check", "--no-io")
    assert code == 0 and err == ""
    resolved = json.loads(out)
    assert resolved == TrainDecoderConfig.from_dict(minimal_config).to_dict()
    assert resolved["decoder"]["timesteps"] == 1000 and resolved["train"]["epochs"] == 20
    assert resolved["data"]["splits"] == {"train": 0.75, "val": 0.15, "test": 0.1}
    assert resolved["tracker"]["save"][0]["save_type"] == "checkpoint"
    assert TrainDecoderConfig.from_dict(resolved) == TrainDecoderConfig.from_dict(minimal_config)


def test_check_prints_every_problem_and_exits_2(capsys, minimal_config, write_config):
    minimal_config["decoder"]["unets"][0]["dim_mult"] = [1, 2]
    minimal_config["data"]["splits"] = {"train": 0.9}
    path = write_config(minimal_config)
    code, out, err = run_main(capsys, "--config_file", path, "--check", "--no-io")
    assert code == 1 and out == ""
    assert err.splitlines() == [
        f"{path}: 2 problems",
        "  decoder.unets[0].dim_mult: unknown option (did you mean dim_mults?)",
        "  data.splits: train + val + test must sum to 1 (got 0.9 + 0.15 + 0.1 = 1.15)",
    ]


def test_warnings_go_to_stderr(capsys, minimal_config, write_config):
    minimal_config["decoder"]["image_size"] = 64
    code, out, err = run_main(capsys, "--config_file", write_config(minimal_config), "--check", "--no-io")
    assert code == 0 and json.loads(out)["decoder"]["image_size"] == 64
    assert err.startswith("warning: decoder.image_size: accepted for compatibility and ignored")


def test_set_overrides_before_validation(capsys, minimal_config, write_config):
    path = write_config(minimal_config)
    code, out, _ = run_main(
        capsys,
        "--config_file",
        path,
        "--check",
        "--no-io",
        "--set",
        "train.lr=3e-4",
        "--set",
        "decoder.unets[0].dim=32",
        "--set",
        "tracker.data_path=/scratch/run 1",
        "--set",
        "evaluate.FID.feature=64",
        "--set",
        "train.unet_training_mask=[true]",
        "--set",
        "data.preprocessing.RandomHorizontalFlip=true",
    )
    assert code == 0
    resolved = json.loads(out)
    assert resolved["train"]["lr"] == 3e-4
    assert resolved["decoder"]["unets"][0]["dim"] == 32
    assert resolved["tracker"]["data_path"] == "/scratch/run 1"  # not JSON: taken as a string
    assert resolved["evaluate"]["FID"] == {"feature": 64}
    assert resolved["train"]["unet_training_mask"] == [True]
    assert resolved["data"]["preprocessing"] == {"RandomHorizontalFlip": True}  # the object replaces the default


def test_set_values_are_validated_like_the_file(capsys, minimal_config, write_config):
    code, _, err = run_main(
        capsys,
        "--config_file",
        write_config(minimal_config),
        "--check",
        "--no-io",
        "--set",
        "train.lrr=1",
        "--set",
        'train.epochs="ten"',
    )
    assert code == 1
    assert "  train.lrr: unknown option (did you mean lr?)" in err.splitlines()
    assert '  train.epochs: expected an integer, got "ten"' in err.splitlines()


@pytest.mark.parametrize(
    "override, problem",
    [
        ("decoder.unets[3].dim=8", "--set decoder.unets[3].dim: decoder.unets has 1 entries, no index 3"),
        ("decoder.unet[0].dim=8", "--set decoder.unet[0].dim: decoder.unet does not exist (did you mean unets?)"),
        ("data.webdataset_base_url.x=1", "--set data.webdataset_base_url.x: data.webdataset_base_url is not an object"),
        ("decoder[0]=1", "--set decoder[0]: decoder is not a list"),
        ("train..lr=1", "--set train..lr: not a path like decoder.unets[0].dim"),
    ],
)
def test_bad_override_paths_are_named(capsys, minimal_config, write_config, override, problem):
    path = write_config(minimal_config)
    code, out, err = run_main(capsys, "--config_file", path, "--check", "--no-io", "--set", override)
    assert code == 1 and out == ""
    assert err.splitlines() == [f"{path}: 1 problem", f"  {problem}"]


def test_set_without_equals_is_a_usage_error(capsys, minimal_config, write_config):
    with pytest.raises(SystemExit) as caught:
        cli.main(["--config_file", str(write_config(minimal_config)), "--set", "train.lr"])
    assert caught.value.code == 2
    assert "expected KEY.PATH=VALUE" in capsys.readouterr().err


@pytest.fixture
def world_ready(monkeypatch):
    """The world checks pass (the minimal config points at no real data or GPU): the CLI alone is tested."""
    monkeypatch.setattr("dalle2_decoder.preflight.ensure_ready", lambda *args, **kwargs: None)


def test_training_calls_the_training_loop_with_the_config(
    capsys, monkeypatch, minimal_config, write_config, world_ready
):
    received = []
    monkeypatch.setattr(cli, "train", lambda config, stop=None: received.append(config) or 0)
    code, _, _ = run_main(capsys, "--config_file", write_config(minimal_config), "--set", "seed=7")
    assert code == 0
    assert received == [TrainDecoderConfig.from_dict(dict(minimal_config, seed=7))]


def test_config_errors_are_not_trained(capsys, monkeypatch, minimal_config, write_config):
    monkeypatch.setattr(cli, "train", lambda config: pytest.fail("training started on a bad config"))
    minimal_config["train"] = {"epochs": 0}
    code, _, err = run_main(capsys, "--config_file", write_config(minimal_config))
    assert code == 1 and "train.epochs: must be at least 1 (got 0)" in err


def test_only_rank_0_prints(capsys, monkeypatch, minimal_config, write_config):
    monkeypatch.setenv("RANK", "1")
    minimal_config["train"] = {"epochs": 0}
    code, out, err = run_main(capsys, "--config_file", write_config(minimal_config))
    assert code == 1 and out == "" and err == ""


@pytest.mark.slow
def test_train_decoder_script_reports_config_errors_without_a_traceback(minimal_config, write_config):
    minimal_config["decoder"]["unets"][0]["dim_mult"] = [1, 2]
    path = write_config(minimal_config)
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train_decoder.py"), "--config_file", str(path), "--check", "--no-io"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert "Traceback" not in result.stderr
    assert "decoder.unets[0].dim_mult: unknown option (did you mean dim_mults?)" in result.stderr


@pytest.mark.slow
def test_console_command_checks_a_config(minimal_config, write_config):
    """The installed `dalle2-train-decoder` command is the same CLI."""
    from importlib.metadata import entry_points

    (command,) = [entry for entry in entry_points(group="console_scripts") if entry.name == "dalle2-train-decoder"]
    assert command.value == "dalle2_decoder.cli:main"
    executable = os.path.join(sysconfig.get_path("scripts"), "dalle2-train-decoder")
    result = subprocess.run(
        [executable, "--config_file", str(write_config(minimal_config)), "--check", "--no-io"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == TrainDecoderConfig.from_dict(minimal_config).to_dict()
