"""The run context (runtime.RunContext) and the tracker protocol (tracking/protocol.py): what the
training loop is given, typed, instead of attributes attached to other objects and read back with
`getattr`."""

import ast
from pathlib import Path

import pytest
import torch

from dalle2_decoder.config import TrainDecoderConfig
from dalle2_decoder.runtime import ComputeThreads, RunContext, create_accelerator, create_run
from dalle2_decoder.tracking.protocol import TrackerProtocol
from dalle2_decoder.tracking.tracker import NullTracker

PACKAGE = Path(__file__).resolve().parents[1] / "dalle2_decoder"
RAW = {
    "decoder": {"unets": [{"dim": 8, "image_embed_dim": 8}], "image_sizes": [16]},
    "data": {"webdataset_base_url": "/tmp/x/{}.tar", "num_workers": 0},
    "train": {"device": "cpu"},
    "tracker": {"log": {"log_type": "console"}, "save": {"save_to": "local", "save_latest_to": "x.pth"}},
}


def test_create_run_gives_the_accelerator_sharding_and_thread_policy_and_attaches_nothing(monkeypatch):
    for name in ("WORLD_SIZE", "ACCELERATE_MIXED_PRECISION", "LOCAL_RANK", "ACCELERATE_USE_FSDP", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    try:
        run = create_run(TrainDecoderConfig.from_dict(RAW))
    finally:
        torch.set_num_threads(threads)
    assert isinstance(run, RunContext)
    assert run.accelerator.device.type == "cpu"
    assert run.sharding is None  # no FSDP launch
    assert isinstance(run.compute_threads, ComputeThreads)  # on the CPU, OMP_NUM_THREADS unset
    assert not hasattr(run.accelerator, "sharding") and not hasattr(run.accelerator, "compute_threads")
    with pytest.raises(AttributeError):
        run.sharding = None  # frozen


def test_create_accelerator_keeps_its_arguments_and_leaves_threads_to_the_user(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    accelerator = create_accelerator(TrainDecoderConfig.from_dict(RAW), purpose="evaluation")
    assert accelerator.device.type == "cpu" and not hasattr(accelerator, "compute_threads")
    assert create_run(TrainDecoderConfig.from_dict(RAW)).compute_threads is None


def _tracker_uses(path: Path):
    """Names read from `tracker` or `self.tracker` in a module, and the `getattr` calls on either."""
    names, getattrs = set(), []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            owner = node.value
            if (isinstance(owner, ast.Name) and owner.id == "tracker") or (
                isinstance(owner, ast.Attribute) and owner.attr == "tracker"
            ):
                names.add(node.attr)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" and node.args:
            target = ast.unparse(node.args[0])
            if target.endswith(("tracker", "accelerator", "acc")):
                getattrs.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    return names, getattrs


def test_the_protocol_lists_every_tracker_attribute_training_uses_and_nothing_reads_them_by_getattr():
    declared = set(TrackerProtocol.__annotations__) | {
        name for name in vars(TrackerProtocol) if not name.startswith("_")
    }
    used, getattrs = set(), []
    for path in sorted((PACKAGE / "training").glob("*.py")):
        names, calls = _tracker_uses(path)
        used |= names
        getattrs += calls
    used -= {"progress_interval_s"}  # the tracker *config*'s option (config.tracker), not the tracker
    assert used, "the walk found no tracker use: it no longer sees the loop"
    assert used <= declared, f"used by training/ but not in TrackerProtocol: {sorted(used - declared)}"
    assert getattrs == []


@pytest.mark.parametrize("name", ["data_path", "config_json", "config_dict"])
def test_the_null_tracker_has_every_attribute_of_the_protocol(name):
    # The other processes' tracker answers None where it has nothing (training reads these directly).
    assert getattr(NullTracker(), name) is None
    assert isinstance(NullTracker(), TrackerProtocol)
