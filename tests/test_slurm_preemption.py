"""Pre-emption end to end on a real SLURM cluster: warning signal, save, requeue, auto-resume, same weights.

The shipped sbatch script asks SLURM for SIGUSR1 to its batch shell before the time limit
(`#SBATCH --signal=B:USR1@...`). `scancel --signal=USR1 --batch` is what slurmctld does then, sent
now rather than minutes before a time limit. The signal has to cross srun, `accelerate launch` and
torchrun's agent to reach the training processes on both nodes; they save at the next step and
exit cleanly; the script requeues the job; the requeued job auto-resumes from the checkpoint.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import torch

from dalle2_decoder.tracking import read_file

from .slurm_jobs import final_weights, job_config, job_info, slurm_cluster, submit, wait_for  # noqa: F401 (fixture)
from .training_fixtures import write_tiny_demo

pytestmark = pytest.mark.slow

TRAIN = dict(epochs=2, epoch_samples=192, save_every_n_samples=10_000)
"""24 steps an epoch on each of the 2 ranks: a signal sent once a step is done lands inside the first
epoch (on a machine that trains 60 samples a second, the job's second epoch still leaves a few
seconds after the first progress line)."""

TRAINED = re.compile(r"epoch 1/\d+ training \d+%: [1-9]\d*/\d+ batches")
"""A progress line past batch 0 (the job's config asks for one a second): a step has been trained."""


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_tiny_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, demo_data, tmp_path_factory):
    """The final weights of the job run to its end without a signal."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    job = submit(slurm_cluster, job_config(demo_data, folder / "run", folder, **TRAIN), folder)
    assert job.returncode == 0, job.output
    return final_weights(folder / "run")


def assert_same_weights(expected, got) -> None:
    assert expected.keys() == got.keys()
    # Exactly: both jobs run the same processes on this host with the same kernels and thread count
    # (OMP_NUM_THREADS=1, tests/slurm_jobs.py), gloo sums the 2 ranks' gradients in either order to
    # the same value, and everything the steps read is in the checkpoint.
    different = [name for name in expected if not torch.equal(got[name], expected[name])]
    worst = max(((got[n].double() - expected[n].double()).abs().max().item() for n in different), default=0.0)
    assert not different, f"{len(different)} tensors differ (max difference {worst:.3g}): {different[:5]}"
    assert any(not torch.equal(value, torch.zeros_like(value)) for value in got.values())


def test_preempted_job_saves_requeues_resumes_and_ends_with_the_weights_of_an_uninterrupted_job(
    slurm_cluster, demo_data, uninterrupted, tmp_path
):
    cluster = slurm_cluster

    interrupted = tmp_path / "interrupted"
    job = submit(cluster, job_config(demo_data, interrupted, tmp_path, **TRAIN), tmp_path, wait=False)
    # The training processes have installed their handlers once the main one prints its summary.
    # A step trained (a progress line past batch 0; the job's config asks for one a second): a stop
    # before the first step has nothing to save.
    wait_for(lambda: TRAINED.search(job.output), 300, "the job to train a step")
    signalled = subprocess.run(
        ["scancel", "--signal=USR1", "--batch", job.job_id],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert signalled.returncode == 0, signalled.stderr

    # The job saves, the script requeues it, and SLURM starts it again after its requeue hold (the
    # credential lifetime, cred_expire: 10 s in the test cluster, 120 s by default; the old job's
    # credential stays revoked until then, so lifting the hold early fails with "Job credential revoked").
    def requeued() -> bool:
        info = job_info(cluster, job.job_id)
        # A job that ended instead (the signal killed the launchers, say) will never be requeued.
        assert info.get("JobState") not in ("FAILED", "COMPLETED", "CANCELLED", "TIMEOUT"), (info, job.output)
        return int(info.get("Restarts", "0")) == 1

    wait_for(requeued, 300, "the job to be requeued")
    first_run = job.output
    assert "SIGUSR1: asking the training processes to save and stop" in first_run
    assert "stopped by SIGUSR1 during training of epoch 1" in first_run and "checkpoint saved" in first_run
    assert f"saved after SIGUSR1: requeueing job {job.job_id}" in first_run
    wait_for(
        lambda: job_info(cluster, job.job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
        600,
        "the requeued job to finish",
    )
    info = job_info(cluster, job.job_id)
    output = job.output
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, output)

    # The requeued job (restart 1) resumed mid-epoch from the checkpoint saved at the signal.
    assert f"job {job.job_id} (restart 1)" in output
    resumed = [line for line in output.splitlines() if line.startswith("resumed from auto-resume")]
    assert len(resumed) == 1 and f"{interrupted / 'latest.pth'}: epoch 1," in resumed[0], output
    samples_at_stop = int(resumed[0].split(", ")[1].split()[0])
    assert 0 < samples_at_stop < 192, resumed[0]  # stopped inside the first epoch, not at its end
    assert "parameters identical across 2 processes" in output and output.count("training finished") == 1

    assert_same_weights(uninterrupted, final_weights(interrupted))


def test_sigterm_to_every_process_of_the_training_step_saves_and_the_job_submitted_again_ends_as_if_never_stopped(
    slurm_cluster, demo_data, uninterrupted, tmp_path
):
    """`scancel --signal=TERM`: SIGTERM to every process of the job's steps at once (the launchers,
    the training processes, their dataloader workers). The training processes save and stop; the
    launchers report the signal they got (torchrun's own traceback) and end the step."""
    cluster = slurm_cluster
    stopped = tmp_path / "stopped"
    config = job_config(demo_data, stopped, tmp_path, **TRAIN)
    job = submit(cluster, config, tmp_path, wait=False)
    # A step trained, not a fixed wait: a fast machine ends the whole job in a few seconds (any phase
    # will do: each is stopped the same way).
    wait_for(lambda: TRAINED.search(job.output), 300, "the job to train a step")
    signalled = subprocess.run(
        ["scancel", "--signal=TERM", job.job_id],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert signalled.returncode == 0, signalled.stderr
    wait_for(
        lambda: job_info(cluster, job.job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
        300,
        "the job to end",
    )
    output = job.output
    said = re.findall(
        r"stopped by SIGTERM during [a-z ]+ of epoch \d+ \((\d+) samples seen\): (checkpoint saved|nothing new)", output
    )
    assert len(said) == 1, output
    samples = int(said[0][0])
    # The only tracebacks are the launchers' own report of the signal they got (torchrun's, one per node).
    assert "internal error" not in output
    assert output.count("Traceback") == output.count("SignalException: Process"), output
    if said[0][1] == "checkpoint saved":
        assert read_file(stopped / "latest.pth").state["progress"]["samples_seen"] == samples

    again = submit(cluster, config, tmp_path)
    assert again.returncode == 0, again.output
    assert samples == 0 or f"{samples} samples seen" in again.output, again.output
    assert_same_weights(uninterrupted, final_weights(stopped))
