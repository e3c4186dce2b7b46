"""Stop signals in every phase, sent as schedulers and shells send them, and what a resumed run makes of them.

A run is stopped again and again: in training (TERM and INT to its whole process group, dataloader
workers included, as SLURM, `timeout` and Ctrl-C send them), in validation, in evaluation and in the
sample grids (each signal, to the group or to one process), and auto-resumed after each stop. Every
stop must end the processes within 30 s with the "stopped" status, one line on the main process and
no traceback, before another U-Net evaluation starts; every checkpoint must name the phase it cut
short; and the chain must end with the weights, the logged values and the sample grids of a run
that was never stopped. On 1 process (with one dataloader worker) and on 2 processes, started as
`srun` starts a run's tasks: each rank its own process, all in one process group.

The signals are real and so is everything they reach; `tests/stop_driver.py` only chooses the
moment, in the middle of a phase's work (during a U-Net evaluation, not at a check).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import numpy as np
import pytest
import torch
from PIL import Image

from dalle2_decoder.failures import EXIT_OK, EXIT_STOPPED
from dalle2_decoder.tracking import read_file

from .conftest import REPO_ROOT
from .evaluation_fixtures import write_networks
from .slurm_cluster import free_ports
from .training_fixtures import tiny_config, write_tiny_demo

pytestmark = pytest.mark.slow

STOPPED_WITHIN_S = 30
"""SLURM's default KillWait between SIGTERM and SIGKILL."""
TIMING_KEYS = ("time", "train/samples_per_s", "eval/seconds")
"""Logged values that measure the machine, not the run."""


class Stop(NamedTuple):
    phase: str  # as the checks name it
    signal: str
    target: str  # "group": the run's process group; "self": the sending rank only
    after: int = 2  # during the U-Net evaluation after the phase's n-th check in that process
    rank: int = 0  # the rank that sends it
    saved_phase: str = ""  # the phase the checkpoint records (the training loop's Phase values)


# On each process count: every phase, every signal in the phases after training, to the group and to
# one process (a Latin square over the two counts: after the handler, which
# tests/test_stopping.py checks for each signal, the signals take one path).
ONE_PROCESS = [
    Stop("training", "TERM", "group", after=3, saved_phase="train"),
    Stop("training", "INT", "group", after=5, saved_phase="train"),  # 2 of the checks re-read the first batches
    Stop("validation", "USR1", "self", saved_phase="validate"),
    Stop("evaluation", "TERM", "self", saved_phase="evaluate"),
    Stop("sample grids", "INT", "group", after=3, saved_phase="sample"),
]
TWO_PROCESSES = [
    Stop("training", "INT", "group", after=3, saved_phase="train"),
    Stop("training", "TERM", "group", after=5, saved_phase="train"),
    Stop("validation", "TERM", "self", rank=1, saved_phase="validate"),  # one rank only: both stop
    Stop("evaluation", "USR1", "group", saved_phase="evaluate"),
    Stop("sample grids", "INT", "group", after=3, saved_phase="sample"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("stops")
    return write_tiny_demo(root / "demo"), write_networks(root / "networks")


def run_config(data, networks, data_path: Path, processes: int) -> Dict:
    """1 epoch of 6 steps a rank, 4+ validation batches a rank, 16 evaluation samples, 2 grids of 2,
    8 diffusion timesteps.

    One epoch holds a stop in every phase; crossing an epoch's end on resume is
    tests/test_training_loop.py's and tests/test_sharded_training.py's."""
    config = tiny_config(
        data, data_path, epochs=1, epoch_samples=24 * processes, validation_samples=None, save_every_n_samples=10**6
    )
    config["data"]["splits"] = {"train": 0.5, "val": 0.34, "test": 0.16}  # 3 / 2 / 1 shards of 16
    config["evaluate"] = {"n_evaluation_samples": 16, "FID": {"feature": networks["features"], "normalize": True}}
    # 8 DDPM steps per sample, not 20: still a fresh noise draw per step (the random state a resume
    # must restore exactly) and more U-Net calls than any stop waits for (at most 5 checks), at
    # less than half the sampling time of the 14 launches.
    config["decoder"]["timesteps"] = 8
    return config


class Launch(NamedTuple):
    codes: List[int]
    outputs: List[str]
    reports: List[dict]
    seconds_after_signal: Optional[float]


def launch(command: List[str], processes: int, work: Path, stop: Optional[Stop] = None) -> Launch:
    """`command` (`train ARGS...`, `sample ...`, `evaluate ...`) on `processes` processes started
    directly, in one new process group (as `srun` starts tasks), with `stop` sent by the driver;
    waits for every process to end."""
    work.mkdir(parents=True, exist_ok=True)
    base = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "STOP_REPORT": str(work / "report")}
    if stop is not None:
        base.update(
            STOP_PHASE=stop.phase,
            STOP_SIGNAL=stop.signal,
            STOP_TARGET=stop.target,
            STOP_AFTER=str(stop.after),
            STOP_RANK=str(stop.rank),
        )
    port = free_ports(1)[0]
    logs = [work / f"rank{rank}.log" for rank in range(processes)]
    spec = []
    for rank in range(processes):
        env = dict(base)
        if processes > 1:
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(processes),
                LOCAL_WORLD_SIZE=str(processes),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        argv = [sys.executable, "-m", "tests.stop_driver", *command]
        spec.append({"argv": argv, "env": env, "log": str(logs[rank])})
    spec_path = work / "group.json"
    spec_path.write_text(json.dumps(spec))
    group = subprocess.Popen(
        [sys.executable, "-m", "tests.stop_driver", "group", str(spec_path)], cwd=REPO_ROOT, start_new_session=True
    )
    try:
        assert group.wait(timeout=600) == 0
        ended = time.time()
    finally:
        if group.poll() is None:
            os.killpg(group.pid, signal.SIGKILL)
    codes = json.loads((work / "group.json.codes").read_text())
    # The group is empty once its processes have ended: no dataloader worker outlived its rank.
    deadline = time.time() + 10
    while time.time() < deadline and _group_alive(group.pid):
        time.sleep(0.2)
    assert not _group_alive(group.pid), "a process of the run's group outlived it"
    reports = [json.loads((work / f"report.{rank}.json").read_text()) for rank in range(processes)]
    sent = [report["sent_at"] for report in reports if report["sent_at"]]
    outputs = [log.read_text() for log in logs]
    return Launch(codes, outputs, reports, ended - sent[0] if sent else None)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def logged(data_path: Path) -> List[dict]:
    """metrics.jsonl without the values that time the machine."""
    lines = [json.loads(line) for line in (data_path / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in line.items() if key not in TIMING_KEYS} for line in lines]


def grids(data_path: Path) -> Dict[str, np.ndarray]:
    return {
        str(path.relative_to(data_path)): np.asarray(Image.open(path))
        for path in sorted((data_path / "samples").rglob("*.png"))
    }


def final_state(data_path: Path) -> Dict[str, torch.Tensor]:
    trainer = read_file(data_path / "latest.pth").state["trainer"]
    weights = {f"decoder.{name}": tensor for name, tensor in trainer["decoder"].items()}
    for unet, ema in trainer["emas"].items():
        weights.update({f"ema{unet}.{name}": tensor for name, tensor in ema.items() if torch.is_tensor(tensor)})
    return weights


def assert_stopped_at_once(reports: List[dict], where: str) -> None:
    """The work unit in progress when the signal was sent (a step, a validation batch, a U-Net call)
    was the last: the sender started no U-Net evaluation after sending it, no rank passed a check
    after receiving it, and a rank that received it before starting its share of that unit started
    at most that one (one U-Net evaluation in these runs: one trained U-Net, cond_scale 1)."""
    for rank, report in enumerate(reports):
        if report["received_at"] is None:
            continue
        assert report["checks_passed_after"] == 0, (where, rank, report)
        assert report["calls_after"] <= (0 if report["sent_at"] else 1), (where, rank, report)


def check_stop(result: Launch, stop: Stop, data_path: Path, previous_samples: int) -> int:
    """One stopped launch: as fast, as quiet and as complete as promised. Returns the samples seen at the stop."""
    where = f"{stop.signal} to {stop.target} in {stop.phase}"
    everything = "\n".join(result.outputs)
    assert result.codes == [EXIT_STOPPED] * len(result.codes), (where, result.codes, everything[-3000:])
    assert "Traceback" not in everything and "internal error" not in everything, (where, everything[-3000:])
    said = rf"stopped by SIG{stop.signal} during {stop.phase} of epoch \d \((\d+) samples seen\): .*"
    lines = re.findall(said, everything)
    assert len(lines) == 1 and "stopped by" in result.outputs[0], (where, everything[-3000:])  # the main rank's line
    assert "checkpoint saved" in everything and "run the same command again to resume" in everything, where
    assert result.seconds_after_signal is not None and result.seconds_after_signal < STOPPED_WITHIN_S, where
    assert_stopped_at_once(result.reports, where)
    assert sum(report["received_at"] is not None for report in result.reports) == (
        len(result.reports) if stop.target == "group" else 1
    ), where
    progress = read_file(data_path / "latest.pth").state["progress"]
    assert progress["phase"] == stop.saved_phase, (where, progress)
    samples = int(lines[0])
    assert progress["samples_seen"] == samples and samples >= previous_samples, (where, progress)
    if stop.saved_phase == "train":
        assert 0 < progress["batches_in_epoch"] < 6 and samples > previous_samples, (where, progress)
    assert json.loads((data_path / "run_state.json").read_text())["finished"] is False, where
    return samples


@pytest.mark.parametrize("processes, stops", [(1, ONE_PROCESS), (2, TWO_PROCESSES)], ids=["1-process", "2-processes"])
def test_stops_in_every_phase_then_resumes_to_the_run_never_stopped(world, tmp_path, write_config, processes, stops):
    data, networks = world
    reference = tmp_path / "reference"
    train = ["train", "--config_file"]
    reference_config = write_config(run_config(data, networks, reference, processes))
    result = launch([*train, str(reference_config)], processes, tmp_path / "r")
    assert result.codes == [EXIT_OK] * processes, "\n".join(result.outputs)[-3000:]

    stopped = tmp_path / "stopped"
    command = [*train, str(write_config(run_config(data, networks, stopped, processes)))]  # auto_resume: true
    samples = 0
    for index, stop in enumerate(stops):
        samples = check_stop(launch(command, processes, tmp_path / f"s{index}", stop), stop, stopped, samples)
    result = launch(command, processes, tmp_path / "last")
    assert result.codes == [EXIT_OK] * processes, "\n".join(result.outputs)[-3000:]
    assert "Traceback" not in "\n".join(result.outputs)

    expected, got = final_state(reference), final_state(stopped)
    assert expected.keys() == got.keys()
    # Exact: the same processes, kernels and thread count (OMP_NUM_THREADS=1) do the same arithmetic
    # in the same order, and every stop is resumed from the state of the point it cut.
    assert [name for name in expected if not torch.equal(expected[name], got[name])] == []
    assert logged(stopped) == logged(reference)
    reference_grids, stopped_grids = grids(reference), grids(stopped)
    assert reference_grids.keys() == stopped_grids.keys() and len(reference_grids) == 2  # 2 grids an epoch
    assert all(np.array_equal(reference_grids[name], stopped_grids[name]) for name in reference_grids)


# --- the commands -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(world, tmp_path_factory):
    """A model save of the tests' decoder (untrained: what it draws does not matter here), config included."""
    from dalle2_decoder.config import TrainDecoderConfig
    from dalle2_decoder.tracking import save_model

    data, networks = world
    root = tmp_path_factory.mktemp("model")
    raw = run_config(data, networks, root / "run", 1)
    raw["decoder"]["timesteps"] = 20  # the commands' stops below count on 20 U-Net calls per image
    torch.manual_seed(0)
    path = root / "model.safetensors"
    decoder = TrainDecoderConfig.from_dict(raw).decoder.create()
    save_model(path, decoder.state_dict(), step=0, config_json=json.dumps(raw))
    embeds = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    np.save(root / "embeds.npy", embeds)
    return {"path": path, "raw": raw, "embeds": root / "embeds.npy"}


@pytest.mark.parametrize("processes", [1, 2])
def test_the_sampling_command_stops_within_a_unet_call_and_leaves_whole_files(model, tmp_path, processes):
    out = tmp_path / "out"
    command = ["sample", "--model", str(model["path"]), "--embeddings", str(model["embeds"])]
    command += ["--num_per_input", "2", "--batch_size", "1", "--out", str(out)]
    # 6 images, 20 U-Net calls each (DDPM over 20 timesteps); the last rank stops inside its second batch.
    stop = Stop("sampling", "TERM", "self", after=25, rank=processes - 1)
    result = launch(command, processes, tmp_path / "run", stop)
    everything = "\n".join(result.outputs)
    assert result.codes == [EXIT_STOPPED] * processes, everything[-3000:]
    assert "Traceback" not in everything, everything[-3000:]
    assert result.seconds_after_signal < STOPPED_WITHIN_S
    assert_stopped_at_once(result.reports, "sampling")
    written = processes  # every rank finished its first batch of 1 image before the stop
    said = f"stopped by SIGTERM during sampling: {written} of 6 images written to {out}"
    assert said in result.outputs[0] and said not in "".join(result.outputs[1:]), everything[-3000:]
    summary = json.loads((out / "samples.json").read_text())
    assert summary["count"] == written and summary["complete"] is False and summary["stopped_by"] == "SIGTERM"
    for entry in summary["images"]:  # each file listed is whole
        assert np.asarray(Image.open(out / entry["file"])).shape == (16, 16, 3)
    assert sorted(path.name for path in (out / "images").iterdir()) == sorted(
        Path(entry["file"]).name for entry in summary["images"]
    )  # and nothing else is there (no half-written temporary file)
    assert not (out / "grid.png").exists()


def test_the_evaluation_command_stops_within_a_unet_call_and_says_how_far_it_got(model, world, tmp_path, write_config):
    config = write_config(model["raw"])
    output = tmp_path / "metrics.jsonl"
    command = ["evaluate", "--config_file", str(config), "--checkpoint", str(model["path"]), "--output", str(output)]
    stop = Stop("evaluation", "INT", "group", after=30)  # inside the second batch of 4
    result = launch(command, 1, tmp_path / "run", stop)
    everything = "\n".join(result.outputs)
    assert result.codes == [EXIT_STOPPED], everything[-3000:]
    assert "Traceback" not in everything and "{" not in everything, everything[-3000:]  # no metrics printed
    assert result.seconds_after_signal < STOPPED_WITHIN_S
    assert_stopped_at_once(result.reports, "evaluation")
    assert "stopped by SIGINT during evaluation: 4 of this process's 16 images generated; no metrics written" in (
        everything
    )
    assert not output.exists()
