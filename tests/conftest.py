"""Shared fixtures: the repository root and small valid configurations to start tests from."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import sys
from typing import Any, Callable, Dict, List

import pytest
from hypothesis import HealthCheck, Phase, settings

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

TINY_UNET_OPTIONS: Dict[str, Any] = dict(
    cond_dim=8,
    num_resnet_blocks=1,
    attn_heads=2,
    attn_dim_head=4,
    cross_attn_heads=2,
    cross_attn_dim_head=4,
    init_cross_embed=False,
    init_conv_kernel_size=3,
)
"""The small U-Net options the model tests share (besides dim, image_embed_dim and dim_mults)."""

# Property-based tests (tests/test_properties_*.py, tests/test_rules_*.py) run the same examples on
# every machine and every run: `derandomize` draws them from a fixed seed, no example database is
# read or written, and no deadline flakes on a busy 2-core runner. Tests that cost more per example
# lower `max_examples` with their own @settings. `HYPOTHESIS_PROFILE=explore` searches more widely
# (random, 1000 examples) when hunting for a bug by hand; see docs/TESTING.md.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=60,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("explore", max_examples=1000, database=None, deadline=None, print_blob=True)
# bench/mutation.py: the same examples as `ci`, without shrinking a failure (a caught mutant needs
# no minimal example, and shrinking can take minutes).
settings.register_profile("mutation", settings.get_profile("ci"), phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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


def cpu_launch_command(*arguments: str) -> List[str]:
    """`accelerate launch` with the shipped CPU multi-process config (2 processes, gloo) on a free port."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO_ROOT / "accelerate_configs" / "cpu_multi_process.yaml"),
        "--main_process_port",
        "0",
        *arguments,
    ]
