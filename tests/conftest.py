"""Shared fixtures: the repository root and small valid configurations to start tests from."""

from __future__ import annotations

import copy
import json
import pathlib
from typing import Any, Callable, Dict, List

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

_MINIMAL_CONFIG: Dict[str, Any] = {
    "decoder": {"unets": [{"dim": 16, "image_embed_dim": 64}], "image_sizes": [64]},
    "data": {"webdataset_base_url": "shards/{}.tar"},
    "tracker": {"log": {"log_type": "console"}, "save": {"save_to": "local", "save_latest_to": "latest.pth"}},
}


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models gain nothing from a second one, and on a busy
    shared machine thread hand-offs dominate (used by the model tests through `pytestmark`)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def repo_root() -> pathlib.Path:
    return REPO_ROOT


@pytest.fixture
def minimal_config() -> Dict[str, Any]:
    """The smallest valid config as parsed JSON (a fresh copy each time, free to modify)."""
    return copy.deepcopy(_MINIMAL_CONFIG)


@pytest.fixture
def write_config(tmp_path: pathlib.Path) -> Callable[[Any], pathlib.Path]:
    """Write a config (parsed JSON) to a file in tmp_path and return its path."""
    counter = iter(range(1_000_000))

    def write(raw: Any, name: str = "") -> pathlib.Path:
        path = tmp_path / (name or f"config_{next(counter)}.json")
        path.write_text(json.dumps(raw, indent=2))
        return path

    return write


@pytest.fixture
def config_problems() -> Callable[[Any], List[str]]:
    """The problems of a config as `path: reason` lines (empty when it loads)."""
    from dalle2_decoder.config import TrainDecoderConfig

    def problems(raw: Any) -> List[str]:
        _, found, _ = TrainDecoderConfig.resolve(raw)
        return found

    return problems
