"""Offline backbones: Inception and LPIPS weights from a local file, and clear errors when a download fails."""

import pytest
import torch

from dalle2_decoder.evaluation import EvaluationSetupError, MetricSuite

CPU = torch.device("cpu")


@pytest.fixture
def offline(monkeypatch, tmp_path, refused_url):
    """An empty torch.hub cache and downloads that fail at once (a proxy on a closed loopback port)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, refused_url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.mark.parametrize("metric", ["FID", "IS", "KID"])
def test_missing_inception_weights_name_the_file_and_the_option(offline, metric):
    with pytest.raises(EvaluationSetupError) as raised:
        MetricSuite({metric: {}}, device=CPU, image_size=16)
    message = str(raised.value)
    assert message.startswith(f"evaluate.{metric}: the Inception-v3 weights could not be downloaded")
    assert "weights-inception-2015-12-05-6726825d.pth" in message
    assert f"set evaluate.{metric}.weights_path" in message and str(offline) in message


def test_missing_lpips_backbone_names_the_file_and_the_option(offline):
    with pytest.raises(EvaluationSetupError) as raised:
        MetricSuite({"LPIPS": {"net_type": "squeeze"}}, device=CPU, image_size=16)
    message = str(raised.value)
    assert "squeezenet1_1-b8a52dc0.pth" in message and "set evaluate.LPIPS.weights_path" in message


def random_inception_state():
    """torch-fidelity's Inception-v3 with random weights, built without the download."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    class Fresh(fidelity.FeatureExtractorInceptionV3):
        def load_state_dict(self, state, strict=True):
            return None if state is None else super().load_state_dict(state, strict)

    original = fidelity.load_state_dict_from_url
    fidelity.load_state_dict_from_url = lambda *args, **kwargs: None
    try:
        torch.manual_seed(0)
        return Fresh("inception-v3-compat", ["64"]).state_dict()
    finally:
        fidelity.load_state_dict_from_url = original


@pytest.mark.slow
def test_inception_weights_from_a_local_file(offline, tmp_path):
    state = random_inception_state()
    weights = tmp_path / "my-inception.pth"
    torch.save(state, weights)
    suite = MetricSuite(
        {"FID": {"feature": 64, "weights_path": str(weights)}, "IS": {"feature": 64, "weights_path": str(weights)}},
        device=CPU,
        image_size=16,
    )
    loaded = suite.metrics["FID"].inception.Conv2d_1a_3x3.conv.weight
    assert torch.equal(loaded, state["Conv2d_1a_3x3.conv.weight"])
    generator = torch.Generator().manual_seed(1)
    real, generated = torch.rand(3, 3, 16, 16, generator=generator), torch.rand(3, 3, 16, 16, generator=generator)
    suite.update(real, generated)
    values = suite.compute()
    assert values["eval/FID"] > 0 and values["eval/IS_mean"] > 0.999  # IS is at least 1 up to rounding
    # FID's own option name works too; naming two different files is an error.
    MetricSuite({"FID": {"feature": 64, "feature_extractor_weights_path": str(weights)}}, device=CPU, image_size=16)
    with pytest.raises(
        EvaluationSetupError, match="weights_path and feature_extractor_weights_path name different files"
    ):
        MetricSuite(
            {"FID": {"weights_path": str(weights), "feature_extractor_weights_path": "other.pth"}},
            device=CPU,
            image_size=16,
        )


def test_weights_files_must_exist_and_hold_only_tensors(offline, tmp_path):
    with pytest.raises(EvaluationSetupError, match=r"evaluate\.KID\.weights_path: file not found: .*nothing\.pth"):
        MetricSuite({"KID": {"weights_path": str(tmp_path / "nothing.pth")}}, device=CPU, image_size=16)
    pickled = tmp_path / "pickled.pth"
    torch.save({"object": object()}, pickled)  # not loadable with weights_only
    with pytest.raises(
        EvaluationSetupError, match=r"evaluate\.FID\.weights_path: .*pickled\.pth is not a weights-only state dict"
    ):
        MetricSuite({"FID": {"weights_path": str(pickled)}}, device=CPU, image_size=16)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(
        EvaluationSetupError,
        match=r"evaluate\.LPIPS\.weights_path: .*does not load into torchvision's squeeze backbone",
    ):
        MetricSuite({"LPIPS": {"net_type": "squeeze", "weights_path": str(wrong)}}, device=CPU, image_size=16)


def test_lpips_backbone_from_a_local_file(offline, tmp_path):
    import torchvision

    torch.manual_seed(0)
    backbone = torchvision.models.squeezenet1_1(weights=None).state_dict()
    weights = tmp_path / "squeeze.pth"
    torch.save(backbone, weights)
    suite = MetricSuite({"LPIPS": {"net_type": "squeeze", "weights_path": str(weights)}}, device=CPU, image_size=32)
    lpips = suite.metrics["LPIPS"]
    assert torch.equal(lpips.net.net.slices[0][0].weight, backbone["features.0.weight"])
    assert not offline.exists() or not any(offline.iterdir())  # nothing was written to the user's cache
    assert torch.hub.get_dir() == str(offline.parent)  # the hub directory is back to TORCH_HOME's
    generator = torch.Generator().manual_seed(2)
    real = torch.rand(2, 3, 32, 32, generator=generator)
    suite.update(real, real)
    assert suite.compute()["eval/LPIPS"] == pytest.approx(0, abs=1e-6)
    suite.reset()
    suite.update(real, torch.rand(2, 3, 32, 32, generator=generator))
    assert suite.compute()["eval/LPIPS"] > 0


HUB_DIR_CHECK = r"""
import os, sys
from pathlib import Path
import torch
from dalle2_decoder.evaluation.extractors import temporary_hub_dir

home = sys.argv[1]
os.environ["TORCH_HOME"] = home
# 1. Nobody called set_dir: the hub directory follows $TORCH_HOME, inside the block and after it.
with temporary_hub_dir() as hub:
    assert torch.hub.get_dir() == str(hub) and hub.is_dir() and not str(hub).startswith(home), hub
    inside = hub
assert not inside.exists()
assert torch.hub.get_dir() == os.path.join(home, "hub"), torch.hub.get_dir()
os.environ["TORCH_HOME"] = home + "-moved"
assert torch.hub.get_dir() == os.path.join(home + "-moved", "hub"), "no longer follows TORCH_HOME"
# 2. set_dir was called: that directory comes back, and TORCH_HOME is untouched.
torch.hub.set_dir(os.path.join(home, "chosen"))
with temporary_hub_dir() as hub:
    assert torch.hub.get_dir() == str(hub), torch.hub.get_dir()
assert torch.hub.get_dir() == os.path.join(home, "chosen"), torch.hub.get_dir()
assert os.environ["TORCH_HOME"] == home + "-moved"
print("ok")
"""


def test_temporary_hub_dir_restores_exactly_what_was_there(tmp_path):
    """The public-API way to borrow torch.hub's directory: it relies on get_dir() following
    $TORCH_HOME until set_dir is called, which this pins (in a fresh process: set_dir cannot be
    undone)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", HUB_DIR_CHECK, str(tmp_path / "home")], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
