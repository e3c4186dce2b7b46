"""How the tracker is built: what every process's tracker offers the training code, and where local
saves land (one function resolves it for the tracker, its savers, preflight and the command's report)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List

import pytest
import torch

from dalle2_decoder.cli import _write_paths
from dalle2_decoder.config import ConsoleLogConfig, LocalSaveConfig, TrackerConfig, TrainDecoderConfig
from dalle2_decoder.config.tracker import HuggingfaceSaveConfig, local_save_destinations
from dalle2_decoder.preflight import save_problems
from dalle2_decoder.tracking import NullTracker, Tracker, create_tracker, read_file
from dalle2_decoder.tracking.destinations import RESUME_CHECKPOINT, RESUME_SHARDED, local_destinations, protected_paths

ROOT = Path(__file__).resolve().parent.parent
CONSOLE = ConsoleLogConfig(log_type="console")
MODEL_AND_DATA = {
    "decoder": {"unets": [{"dim": 8, "image_embed_dim": 4, "dim_mults": [1]}], "image_sizes": [8]},
    "data": {"webdataset_base_url": "/nonexistent/shards/{}.tar"},
    "train": {"device": "cpu"},
}


def tracker_members_used_by_the_training_code() -> List[str]:
    """Every member the training code and the command read on a tracker (`self.tracker.x`, or
    `getattr(self.tracker, "x", ...)`), found in their source, so a new use is checked too."""
    sources = sorted((ROOT / "dalle2_decoder" / "training").glob("*.py")) + [ROOT / "dalle2_decoder" / "cli.py"]
    names = set()
    for source in sources:
        text = source.read_text()
        names |= set(re.findall(r"\bself\.tracker\.(\w+)", text))
        names |= set(re.findall(r"getattr\(self\.tracker,\s*\"(\w+)\"", text))
    return sorted(names)


def test_every_tracker_member_the_training_code_uses_is_on_both_trackers(tmp_path):
    used = tracker_members_used_by_the_training_code()
    # the loop's attribute reads and its phases' calls, found in its source (the scan works)
    assert {"data_path", "config_json", "config_dict", "load", "save", "log", "info", "finish"} <= set(used)
    config = TrackerConfig(log=CONSOLE, save=[], data_path=str(tmp_path / "run"))
    full_config = {"seed": 1, "tracker": {"data_path": str(tmp_path / "run")}}
    main = create_tracker(config, full_config_dict=full_config, is_main_process=True)
    other = create_tracker(config, full_config_dict=full_config, is_main_process=False)
    assert isinstance(main, Tracker) and isinstance(other, NullTracker)
    for name in used:
        assert hasattr(main, name), f"Tracker has no {name}"
        assert hasattr(other, name), f"NullTracker has no {name}, which the training code uses"
    # read directly, no getattr default needed: the main process's are the run's, the others' None
    assert main.data_path == (tmp_path / "run").resolve() and main.data_path.is_dir()
    assert json.loads(main.config_json) == main.config_dict == full_config
    assert other.data_path is None and other.config_json is None and other.config_dict is None
    # declared with their types (what a typed protocol of the tracker compares)
    assert set(NullTracker.__annotations__) >= {"data_path", "config_json", "config_dict"}
    main.finish()


def saves_config(data_path: Path, **local) -> TrackerConfig:
    """A hub saver first (never local: no destination on this machine), then a local one."""
    hub = HuggingfaceSaveConfig(save_to="huggingface", huggingface_repo="user/repo", save_latest_to="hub.pt")
    return TrackerConfig(log=CONSOLE, save=[hub, LocalSaveConfig(save_to="local", **local)], data_path=str(data_path))


def test_local_save_destinations_resolve_relative_home_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data_path = tmp_path / "run"
    config = saves_config(
        data_path,
        save_latest_to="ckpt/latest_{epoch}.pt",
        save_best_to=str(tmp_path / "best" / "best.pt"),
        save_meta_to="~/meta",
    )
    found = local_save_destinations(config, data_path)
    assert [(dest.index, dest.field, dest.path) for dest in found] == [
        (1, "save_latest_to", data_path / "ckpt" / "latest_{epoch}.pt"),  # relative: under the data path
        (1, "save_best_to", tmp_path / "best" / "best.pt"),  # absolute: as given
        (1, "save_meta_to", tmp_path / "home" / "meta"),  # `~`: the home folder
    ]
    latest_only = local_save_destinations(config, data_path, ("save_latest_to",))
    assert [dest.path for dest in latest_only] == [found[0].path]

    # what the tracker keeps and cleans, and what the command reports a failed write against
    assert local_destinations(config, data_path) == [
        found[0].path,
        found[1].path,
        data_path / RESUME_CHECKPOINT,
        data_path / RESUME_SHARDED,
    ]
    assert {dest.path for dest in found} <= set(protected_paths(config, {}, data_path))
    root = TrainDecoderConfig.from_dict(
        {
            **MODEL_AND_DATA,
            "tracker": {
                "data_path": str(data_path),
                "log": {"log_type": "console"},
                "save": [
                    {"save_to": "local", "save_latest_to": "ckpt/latest_{epoch}.pt", "save_best_to": "/b/best.pt"}
                ],
            },
        }
    )
    assert _write_paths(root) == [str(data_path), str(data_path / "ckpt"), "/b"]


def test_preflight_checks_the_folders_the_savers_write(tmp_path, monkeypatch):
    """A destination under a file cannot be written: preflight names its option, wherever the path
    leads (`~` and relative paths resolved as the savers resolve them)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "a-file").write_text("not a folder")
    (tmp_path / "b-file").write_text("not a folder")
    root = TrainDecoderConfig.from_dict(
        {
            **MODEL_AND_DATA,
            "tracker": {
                "data_path": str(tmp_path / "run"),
                "log": {"log_type": "console"},
                "save": [
                    {"save_to": "local", "save_latest_to": "ok/latest.pt"},
                    {
                        "save_to": "local",
                        "save_latest_to": "~/a-file/latest.pt",
                        "save_best_to": str(tmp_path / "b-file" / "best.pt"),
                    },
                ],
            },
        }
    )
    messages = [problem.message for problem in save_problems(root)]
    assert len(messages) == 2, messages
    assert messages[0].startswith("tracker.save[1].save_latest_to: ") and "a-file" in messages[0]
    assert messages[1].startswith("tracker.save[1].save_best_to: ") and "b-file" in messages[1]


def test_a_local_saver_writes_where_the_destinations_say(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data_path = tmp_path / "run"
    config = saves_config(data_path, save_latest_to="m/latest_{epoch}.pt", save_best_to="~/best.pt", save_type="model")
    config = TrackerConfig(log=CONSOLE, save=config.save[1:], data_path=str(data_path))
    tracker = create_tracker(config, full_config_dict={"seed": 1}, is_main_process=True)
    tracker.save(step=4, model_state={"w": torch.ones(2)}, is_best=True, fields={"epoch": 3})
    tracker.finish()
    latest, best = (dest.path for dest in local_save_destinations(config, tracker.data_path))
    assert read_file(Path(str(latest).format(epoch=3))).step == 4
    assert read_file(best).step == 4


@pytest.mark.parametrize("main", [True, False])
def test_save_takes_the_same_keywords_on_every_process(tmp_path, main):
    """The loop calls `save` alike on every rank: each tracker takes the full set of keywords."""
    config = TrackerConfig(
        log=CONSOLE, save=[LocalSaveConfig(save_to="local", save_latest_to="latest.pt")], data_path=str(tmp_path / "r")
    )
    tracker = create_tracker(config, full_config_dict={"seed": 1}, is_main_process=main)
    tracker.save(step=2, checkpoint_state={"w": torch.zeros(1)}, model_state=None, is_best=False, fields={"epoch": 0})
    tracker.finish()
    assert (tmp_path / "r" / "latest.pt").is_file() == main
