"""Shared fixtures: the repository root and small valid configurations to start tests from."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import shutil
import sys
import tempfile
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


TEST_THREADS = int(os.environ.get("DALLE2_TEST_THREADS", "1"))
"""Compute threads of the tests that run models in the test process (the `compute_threads` fixture)
and of the processes they start: 1 unless DALLE2_TEST_THREADS says otherwise (`make
test-portability` runs the numerical tests with 1 and with 2, since threads split reductions)."""


def child_env(**extra: str) -> Dict[str, str]:
    """The environment for a process a test starts: this one's, the package importable, and
    OMP_NUM_THREADS set to TEST_THREADS (so a training run keeps that many threads)."""
    return {**os.environ, "OMP_NUM_THREADS": str(TEST_THREADS), "PYTHONPATH": str(REPO_ROOT), **extra}


@pytest.fixture
def compute_threads(monkeypatch):
    """TEST_THREADS torch threads for the test (1 by default: tiny models gain nothing from a second
    one, and on a busy shared machine thread hand-offs dominate), and OMP_NUM_THREADS set to the
    same, so a training run in the test keeps them instead of choosing its own (runtime.py) and
    processes the test starts use as many (used by the model tests through `pytestmark`)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    monkeypatch.setenv("OMP_NUM_THREADS", str(TEST_THREADS))
    yield
    torch.set_num_threads(previous)


_ISOLATED_HOME: List[str] = []

_ACCOUNT_VARIABLES = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_ENDPOINT",
    "HF_HUB_OFFLINE",
    "WANDB_API_KEY",
    "WANDB_MODE",
    "WANDB_BASE_URL",
    "WANDB_ENTITY",
    "WANDB_PROJECT",
    "WANDB_DIR",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
)
"""Logins and service settings of whoever runs the suite, which tests that need them set themselves."""


def pytest_configure(config):
    """The suite reads nothing from the home of whoever runs it and writes nothing there: HOME, the
    XDG, Hugging Face and torch caches point into a fresh folder, and the user's service logins
    and settings (_ACCOUNT_VARIABLES, ACCELERATE_*) are unset. A logged-in hub token, CLIP weights
    in the hub cache, a wandb, AWS or accelerate default configuration would otherwise change what
    the tests see (set before any test module imports huggingface_hub, which reads them once)."""
    home = tempfile.mkdtemp(prefix="dalle2-test-home-")
    _ISOLATED_HOME.append(home)
    os.environ.update(
        HOME=home,
        XDG_CACHE_HOME=os.path.join(home, ".cache"),
        XDG_CONFIG_HOME=os.path.join(home, ".config"),
        HF_HOME=os.path.join(home, ".cache", "huggingface"),
        TORCH_HOME=os.path.join(home, ".cache", "torch"),
    )
    for name in [*_ACCOUNT_VARIABLES, *(name for name in os.environ if name.startswith("ACCELERATE_"))]:
        os.environ.pop(name, None)
    # TEST_THREADS compute threads everywhere, in the test processes and the runs they start: two
    # test processes (`make test`) with two threads each on two cores spin-wait for each other
    # (tests of the runtime's own thread choice unset it themselves).
    os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(TEST_THREADS)


def pytest_unconfigure(config):
    for home in _ISOLATED_HOME:
        shutil.rmtree(home, ignore_errors=True)


LONGEST_FILES = (
    "test_sharded_training.py",
    "test_stop_signals.py",
    "test_slurm_preemption.py",
    "test_multinode.py",
    "test_training_loop.py",
    "test_slurm.py",
    "test_bad_inputs.py",
    "test_tracking_retention.py",
    "test_operator_run.py",
    "test_tracking_wandb.py",
    "test_fidelity.py",
    "test_sample_command.py",
    "test_reliability_signals.py",
    "test_evaluation_distributed.py",
)
"""The test files that take longest (measured with --durations), in that order: `make test` gives
whole files to its two processes in collection order (`--no-loadscope-reorder`; pytest-xdist's
default sends the files with the most tests first), so these go first and the short files fill
in at the end instead of one long file running alone after everything else."""


def pytest_collection_modifyitems(config, items):
    first = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the rest keep their order


def pytest_sessionfinish(session):
    """In a pytest-xdist worker: hand this process's numerics counts to the controller, which prints the line."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        from tests.numerics import closest_to_bound

        count, closest = closest_to_bound()
        output["numerics"] = [count, list(closest) if closest is not None else None]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist's controller, as each worker ends: count in its numerics (see pytest_sessionfinish)."""
    from tests.numerics import add_counts

    count, closest = getattr(node, "workeroutput", {}).get("numerics", [0, None])
    add_counts(count, tuple(closest) if closest is not None else None)


def pytest_terminal_summary(terminalreporter):
    """One line on the scale-relative comparisons of tests/numerics.py: how close the closest came."""
    from tests.numerics import closest_to_bound

    count, closest = closest_to_bound()
    if count and closest is not None:
        import torch

        terminalreporter.write_line(
            f"numerics: {count} scale-relative comparisons (CPU kernels {torch.backends.cpu.get_cpu_capability()}, "
            f"{TEST_THREADS} test thread(s)); the closest used {closest[0]:.0%} of its bound: {closest[1]}"
        )


@pytest.fixture
def refused_url():
    """http://127.0.0.1:PORT where connections are refused at once: PORT is bound by this test and
    never listened on (a fixed port such as 9 may have a service on some machines)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


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
