"""Sharded training (FSDP2) on the CPU with gloo: 2 processes equal 1 DDP process on the same global
batch; kill -9 mid-epoch and resume on 2, 1 and 3 processes; checkpoints cross between FSDP and DDP;
the `model` save stays one consolidated safetensors file.

Every run goes through `tests/sample_trace.py`, which records the keys each process trained on."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dalle2_decoder.tracking import read_file
from dalle2_decoder.tracking.sharded import is_sharded_folder, read_whole

from .conftest import REPO_ROOT
from .training_fixtures import tiny_config, write_tiny_demo

pytestmark = pytest.mark.slow

TRACE_SCRIPT = REPO_ROOT / "tests" / "sample_trace.py"
FSDP = REPO_ROOT / "accelerate_configs" / "cpu_fsdp.yaml"
DDP = REPO_ROOT / "accelerate_configs" / "cpu_multi_process.yaml"

FLOAT32_EPS = torch.finfo(torch.float32).eps  # 2**-23: one float32 rounding is at most eps / 2 relative
PARITY_ROUNDING_STEPS = 64
"""FSDP (2 processes) against DDP (1 process accumulating 2 micro-batches) on the same samples and noise.

Both compute every forward and backward on the same values; they differ only in how the two halves
of the global batch's gradient are added (reduce-scatter over 2 processes, then divided, against
accumulation into one buffer, then divided) and in how the clipping norm sums its squares (per shard,
then across processes). Each is a few float32 roundings, relative to the gradient; Adam's update
m / (sqrt(v) + eps) is scale-free, so a relative error of the gradient is the same relative error of
an update of at most lr, which stays far below the weights' own size. We allow 64 roundings (eps / 2
each) of the largest weight for a few optimizer steps; measured: 1.4 (3.0e-7 on a largest weight
of 3.63, 6 steps). That is still over 100 times below the change one step makes (lr = 1e-3).

Not for `NORMALISED_BIASES`, where rounding noise is all the gradient there is."""

NORMALISED_BIASES = "project.bias"
"""The biases of the convolutions that feed a GroupNorm (each block's `project`): GroupNorm removes the
mean of each group of channels, so in exact arithmetic these biases get no gradient (8 channels in 8
groups), or none along their group's mean (16 in 8). What Adam sees there is float32 noise of about
eps times the activations' gradient, which its normalisation m / sqrt(v) turns into steps of up to lr
whose sign is the noise's. Their bound is Adam's: with betas (0.9, 0.99) one step moves a weight by at
most lr (1 - 0.9) / sqrt(1 - 0.99) = lr, so two runs can differ by 2 lr per step. Measured: 2.6e-5
after 6 steps (bound 1.2e-2); every other weight within 1.4 roundings."""

KILLED_AT_STEP = 3
"""The interrupted runs are killed (SIGKILL, launcher and processes) before the micro-batch after
optimizer step 3; their latest checkpoint is the periodic one of step 2 (16 samples, mid-epoch)."""


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_tiny_demo(tmp_path_factory.mktemp("demo"))


def write_run_config(demo_data, folder: Path, **train) -> Path:
    """2 epochs of 48 samples (3 train shards of 16), batch 4 per process, a checkpoint every 16 samples.

    `tracker.data_path` is relative ("run", under the launch's working folder), so that a copy of an
    interrupted run's folder resumes with the same config."""
    raw = tiny_config(demo_data, Path("run"), **{"epochs": 2, "save_every_n_samples": 16, **train})
    raw["train"].pop("epoch_samples")
    raw["train"].pop("validation_samples")  # the whole split: a capped one needs a shard per process
    raw["tracker"]["data_path"] = "run"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(raw, indent=1))
    return path


def copy_run(source: Path, target: Path) -> None:
    """A copy of a run folder (links kept as links) that names its own checkpoints (`run_state.json`
    records the latest by absolute path)."""
    shutil.copytree(source, target, symlinks=True)
    state = target / "run_state.json"
    state.write_text(state.read_text().replace(str(source), str(target)))


def launch(config: Path, cwd: Path, *, processes: int, sharded: bool = True, launch_config=None, **env: str):
    """The training command through `accelerate launch` (the FSDP or DDP CPU config, or `launch_config`),
    or plain Python for one DDP process; returns the finished process."""
    cwd.mkdir(parents=True, exist_ok=True)
    script = [str(TRACE_SCRIPT), "--config_file", str(config)]
    if launch_config is None:
        launch_config = FSDP if sharded else DDP
    if sharded or processes > 1:
        accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config)]
        command = accelerate + ["--num_processes", str(processes), "--main_process_port", "0", *script]
    else:
        command = [sys.executable, *script]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "SAMPLE_TRACE": str(cwd / "trace"), **env}
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), environment.get("PYTHONPATH", "")])
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=900, env=environment)


def checked(result) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def trace(cwd: Path) -> list:
    """Every micro-batch trained, as (step after it, keys), over all processes, in step order."""
    lines = []
    for path in sorted(cwd.glob("trace.*")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(((line["step"], tuple(line["keys"])) for line in lines), key=lambda entry: entry[0])


def epochs_of(steps: list, epoch_samples: int) -> list:
    """The keys of `steps` ((step, keys) in order) cut into epochs of `epoch_samples` samples."""
    epochs, current = [], []
    for _, keys in steps:
        current += keys
        assert len(current) <= epoch_samples, "a step crosses an epoch's end"
        if len(current) == epoch_samples:
            epochs.append(current)
            current = []
    assert not current
    return epochs


def latest(run: Path) -> Path:
    return (run / "latest.pth").resolve()


def decoder_weights(checkpoint: Path) -> dict:
    """The trained weights of a checkpoint, sharded (folder) or whole (file)."""
    if is_sharded_folder(checkpoint):
        prefix = "decoder/"
        return {key[len(prefix) :]: value for key, value in read_whole(checkpoint).items() if key.startswith(prefix)}
    return read_file(checkpoint).state["trainer"]["decoder"]


def assert_close_weights(found: dict, expected: dict, rounding_steps: int, *, lr: float, steps: int) -> None:
    """Every weight within `rounding_steps` float32 roundings of the largest weight, but
    `NORMALISED_BIASES`, within Adam's bound of 2 lr per step (see both)."""
    assert found.keys() == expected.keys()
    scale = max(value.abs().max().item() for value in expected.values())
    for name, value in expected.items():
        normalised = name.endswith(NORMALISED_BIASES)
        bound = 2 * lr * steps if normalised else rounding_steps * FLOAT32_EPS / 2 * scale
        difference = (found[name] - value).abs().max().item()
        assert difference <= bound, f"{name}: largest difference {difference:.3g} > {bound:.3g}"


def stray_files(run: Path) -> list:
    """What a finished run left beyond its checkpoints in place: staged saves, unlinked versions."""
    strays = [p for p in (run / ".staging").glob("*")] if (run / ".staging").exists() else []
    for versions in run.glob(".*.versions"):
        linked = {(run / versions.name[1 : -len(".versions")]).resolve()}
        strays += [p for p in versions.iterdir() if p.resolve() not in linked]
    return strays


# --- 2 sharded processes = 1 DDP process on the same global batch ----------------------------------


def test_two_sharded_processes_train_the_weights_of_one_ddp_process(demo_data, tmp_path):
    """The same global batch (2 x 4 samples) and seed: 2 sharded processes of one data worker each,
    against one DDP process accumulating 2 micro-batches from 2 data workers. An exact epoch gives
    each of the 2 processes, or each of the 2 workers, the same half of the epoch's samples, and the
    one process's loader alternates between its workers, so each micro-batch holds the samples of
    one sharded process's batch; accumulated micro-batch k draws its noise from the stream of
    process k (see `DecoderTrainer._micro_batch_rng`). No sample shuffle (its random stream is per
    process and worker), and one epoch (validation draws noise from each process's own stream)."""
    fsdp_config = write_run_config(demo_data, tmp_path / "fsdp", epochs=1, save_every_n_samples=1000)
    ddp_config = write_run_config(
        demo_data, tmp_path / "ddp", epochs=1, save_every_n_samples=1000, gradient_accumulation_steps=2
    )
    for path, workers in ((fsdp_config, 1), (ddp_config, 2)):
        raw = json.loads(path.read_text())
        raw["data"].update(shuffle_buffer=1, num_workers=workers)
        path.write_text(json.dumps(raw, indent=1))
    output = checked(launch(fsdp_config, tmp_path / "fsdp", processes=2))
    assert "sharded training (FSDP2, FULL_SHARD over 2 process(es))" in output
    checked(launch(ddp_config, tmp_path / "ddp", processes=1, sharded=False))

    fsdp_run, ddp_run = tmp_path / "fsdp" / "run", tmp_path / "ddp" / "run"
    assert is_sharded_folder(latest(fsdp_run)) and not is_sharded_folder(latest(ddp_run))
    # the same samples in each half of each global batch
    fsdp_steps = collections.defaultdict(list)
    for step, keys in trace(tmp_path / "fsdp"):
        fsdp_steps[step].append(keys)
    ddp_steps = collections.defaultdict(list)
    for step, keys in trace(tmp_path / "ddp"):
        ddp_steps[step].append(keys)
    assert len(fsdp_steps) == 6
    assert {s: sorted(k) for s, k in fsdp_steps.items()} == {s: sorted(k) for s, k in ddp_steps.items()}

    parity = dict(lr=1e-3, steps=6)
    assert_close_weights(
        decoder_weights(latest(fsdp_run)), decoder_weights(latest(ddp_run)), PARITY_ROUNDING_STEPS, **parity
    )
    # the model save is one consolidated safetensors file, read by load_decoder, with the DDP run's weights
    from dalle2_decoder import load_decoder

    fsdp_model = load_decoder(fsdp_run / "model.safetensors")
    ddp_model = load_decoder(ddp_run / "model.safetensors")
    assert not list(fsdp_run.glob("model*.safetensors.*"))
    assert_close_weights(fsdp_model.state_dict(), ddp_model.state_dict(), PARITY_ROUNDING_STEPS, **parity)


# --- kill -9 mid-epoch under FSDP, resume on 2, 1 and 3 processes -----------------------------------


@pytest.fixture(scope="module")
def interrupted(demo_data, tmp_path_factory):
    """A sharded 2-process run killed mid-epoch, and the same run uninterrupted."""
    base = tmp_path_factory.mktemp("sharded_runs")
    config = write_run_config(demo_data, base)
    killed = launch(config, base / "killed", processes=2, SAMPLE_TRACE_KILL_AT=str(KILLED_AT_STEP))
    assert killed.returncode != 0, killed.stdout + killed.stderr
    checked(launch(config, base / "whole", processes=2))
    return config, base


@pytest.mark.parametrize("processes", [2, 1, 3])
def test_kill_mid_epoch_under_fsdp_and_resume_on_other_process_counts(interrupted, tmp_path, processes):
    config, base = interrupted
    saved = read_file(latest(base / "killed" / "run"))
    assert saved.state["progress"]["samples_seen"] == 16 and saved.state["progress"]["batches_in_epoch"] == 2
    # resume a copy (links kept as links), with another number of processes where asked
    cwd = tmp_path / "resumed"
    copy_run(base / "killed" / "run", cwd / "run")
    output = checked(launch(config, cwd, processes=processes, SAMPLE_TRACE_WEIGHTS=str(tmp_path / "resumed.pt")))
    if processes != 2:
        assert f"resumed with {processes} x 1 instead of 2 process(es) x 1 worker(s)" in output

    # the weights the resumed run starts from are the checkpoint's
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert resumed["step"] == 2
    checkpoint_weights = decoder_weights(latest(base / "killed" / "run"))
    assert all(torch.equal(resumed["weights"][name], value) for name, value in checkpoint_weights.items())

    # no sample of the interrupted epoch read twice or skipped; the next epoch whole
    whole = epochs_of(trace(base / "whole"), 48)
    before = [keys for step, keys in trace(base / "killed") if step <= 2]
    first = [k for keys in before for k in keys]
    rest, steps = [], trace(cwd)
    while len(first) + len(rest) < 48:
        rest += steps.pop(0)[1]
    assert len(first) + len(rest) == 48, "a resumed step crosses the epoch's end"
    counts = collections.Counter(first + rest)
    assert [key for key, count in counts.items() if count > 1] == []
    assert sorted(counts) == sorted(whole[0])
    assert [sorted(epoch) for epoch in epochs_of(steps, 48)] == [sorted(whole[1])]

    # the run completes, nothing left behind, and with the same processes the uninterrupted weights
    final = read_file(latest(cwd / "run")).state["progress"]
    assert final["epoch"] == 2 and final["samples_seen"] == 96
    assert stray_files(cwd / "run") == []
    if processes == 2:
        found, expected = decoder_weights(latest(cwd / "run")), decoder_weights(latest(base / "whole" / "run"))
        assert all(torch.equal(found[name], value) for name, value in expected.items())


# --- checkpoints cross between FSDP and DDP ---------------------------------------------------------


def test_a_sharded_checkpoint_continues_under_ddp_and_its_ddp_checkpoint_under_fsdp_again(interrupted, tmp_path):
    """The killed sharded run's checkpoint (step 2) continues under DDP on 2 processes, which is killed
    in turn (kill -9) after step 9; its latest checkpoint, a whole file (step 8, 64 samples, in the
    second epoch), continues under FSDP to the end. Both legs see the samples and noise of the
    uninterrupted sharded run, so the final weights are its weights within rounding."""
    config, base = interrupted
    copy_run(base / "killed" / "run", tmp_path / "run")
    killed = launch(config, tmp_path, processes=2, sharded=False, SAMPLE_TRACE_KILL_AT="9")
    assert killed.returncode != 0, killed.stdout + killed.stderr
    ddp_checkpoint = latest(tmp_path / "run")
    assert not is_sharded_folder(ddp_checkpoint)
    assert read_file(ddp_checkpoint).state["progress"]["samples_seen"] == 64

    output = checked(launch(config, tmp_path, processes=2))
    assert "sharded training (FSDP2" in output
    final = latest(tmp_path / "run")
    assert is_sharded_folder(final) and read_file(final).state["progress"]["samples_seen"] == 96
    assert stray_files(tmp_path / "run") == []
    expected = decoder_weights(latest(base / "whole" / "run"))
    assert_close_weights(decoder_weights(final), expected, PARITY_ROUNDING_STEPS, lr=1e-3, steps=12)


# --- HYBRID_SHARD (the multi-node config's layout) on one machine, with retention of its checkpoints --


def test_hybrid_shard_trains_as_full_shard_and_keep_last_removes_old_checkpoint_folders_whole(interrupted, tmp_path):
    """accelerate_configs/fsdp_multi_node.yaml on 2 CPU processes of one machine, as 2 replicas of 1
    shard: the same samples and noise as the uninterrupted FULL_SHARD run, so its weights within
    rounding.

    Its checkpoints go to a templated path with `keep_last: 2`: a sharded checkpoint there is a link
    and a `.<name>.versions` folder of shards, and retention must remove both for an old save and
    keep the newest ones loadable. 2 epochs of 48 samples, a save every 16: 6 saves, the last 2 kept."""
    config, base = interrupted
    raw = json.loads(config.read_text())
    raw["tracker"]["save"][0].update(save_latest_to="ckpt_{samples_seen:03d}.pth", keep_last=2)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw, indent=1))
    text = (REPO_ROOT / "accelerate_configs" / "fsdp_multi_node.yaml").read_text()
    for old, new in [
        ("num_machines: 2", "num_machines: 1"),
        ("num_processes: 16", "num_processes: 2"),
        ("use_cpu: false", "use_cpu: true"),
        ("mixed_precision: bf16", "mixed_precision: 'no'"),
        ("gpu_ids: all\n", ""),
        ("same_network: false", "same_network: true"),
        ("parallelism_config_dp_shard_size: 8", "parallelism_config_dp_shard_size: 1"),
    ]:
        assert old in text
        text = text.replace(old, new)
    hybrid = tmp_path / "hybrid.yaml"
    hybrid.write_text(text)
    output = checked(launch(config, tmp_path, processes=2, launch_config=hybrid))
    assert "HYBRID_SHARD: 2 replicas of 1 shards" in output

    run = tmp_path / "run"
    expected = decoder_weights(latest(base / "whole" / "run"))
    assert_close_weights(decoder_weights(run / "ckpt_096.pth"), expected, PARITY_ROUNDING_STEPS, lr=1e-3, steps=12)
    checkpoints = sorted(path.name for path in run.glob("ckpt_*"))
    assert checkpoints == ["ckpt_080.pth", "ckpt_096.pth"]
    assert sorted(path.name for path in run.glob(".ckpt_*")) == [".ckpt_080.pth.versions", ".ckpt_096.pth.versions"]
    for name, samples in (("ckpt_080.pth", 80), ("ckpt_096.pth", 96)):
        assert (run / name).is_symlink() and is_sharded_folder(run / name)
        assert read_file(run / name).state["progress"]["samples_seen"] == samples
        assert decoder_weights(run / name)  # the shards read back whole
    assert stray_files(run) == []
    (owned,) = json.loads((run / "run_state.json").read_text())["saved_files"].values()
    assert owned == [str(run / "ckpt_080.pth"), str(run / "ckpt_096.pth")]
