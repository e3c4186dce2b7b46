"""The shipped sbatch script on a real SLURM cluster of two nodes (two slurmd on this host, loopback).

The cluster (tests/slurm_cluster.py) is started by the tests themselves and installs slurm-wlm
when missing (as root). Each job trains the tiny demo config on the CPU, one process per node,
over gloo; `sbatch --wait` returns when the job is over.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from dalle2_decoder.tracking import read_file

from .conftest import REPO_ROOT
from .slurm_cluster import LocalSlurmCluster, SlurmSetupError, running_processes
from .slurm_jobs import job_config, slurm_cluster, submit  # noqa: F401 (fixture)
from .training_fixtures import write_tiny_demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_tiny_demo(tmp_path_factory.mktemp("demo"))


def test_two_node_job_trains_with_one_rank_per_node_and_only_the_main_process_writing(
    slurm_cluster, demo_data, tmp_path
):
    data_path = tmp_path / "run"
    config = job_config(demo_data, data_path, tmp_path, epochs=2, epoch_samples=32, save_every_n_samples=16)
    job = submit(slurm_cluster, config, tmp_path)
    output = job.output
    assert job.returncode == 0, output
    # SLURM placed the job on both nodes; the script started one launcher per node with the node's
    # rank, and the first node (its NodeAddr) as the rendezvous.
    assert job.info["NodeList"] == "node[1-2]" and job.info["JobState"] == "COMPLETED", job.info
    assert "nodes=2 gpus/node=1 processes=2 main=127.0.0.1:" in output
    assert "processes      2 (MULTI_CPU)" in output
    for rank in (0, 1):
        assert f"data (train, rank {rank}, epoch 1): 16 samples seen, 16 ok, 0 bad" in output
    assert "process 1 of 2 finished" in output and "process 2 of 2 finished" in output
    # Identical weights on both ranks at the end (the loop gathers every rank's parameter fingerprint).
    assert "parameters identical across 2 processes" in output
    # Only the main process logs and saves: one summary, each metric line once, each grid once.
    assert output.count("dalle2-decoder training") == 1
    assert output.count("training finished") == 1
    # The job's output is a file: plain progress lines from the main process, no bar redraws.
    assert "\r" not in output and "\x1b" not in output
    assert output.count("epoch 2/2 training 100%: 4/4 batches, 32/32 samples") == 1  # its end, once
    lines = [json.loads(line) for line in (data_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["samples_seen"] for line in lines if "val/loss/unet1" in line] == [32, 64]
    assert output.count("train_examples: 4 images written") == 4
    grids = sorted(p.name for p in (data_path / "samples" / "train_examples").glob("*.png"))
    assert grids == ["step_000000016.png", "step_000000032.png", "step_000000048.png", "step_000000064.png"]
    latest = read_file(data_path / "latest.pth")
    assert latest.state["progress"]["samples_seen"] == 64 and len(latest.state["rng"]) == 2
    assert (data_path / "model.safetensors").is_file()


def test_cluster_stop_ends_daemons_steps_and_job_tasks(tmp_path):
    """Stopping a cluster with a job still running leaves no daemon, slurmstepd or task behind."""
    root = tmp_path / "cluster"
    cluster = LocalSlurmCluster(root, nodes=2).start()
    try:
        script = tmp_path / "sleep.sbatch"
        script.write_text("#!/bin/bash\n#SBATCH --nodes=2\nsrun sleep 600\n")
        submitted = subprocess.run(
            ["sbatch", "--parsable", f"--output={tmp_path / 'sleep.out'}", str(script)],
            env=cluster.env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert submitted.returncode == 0, submitted.stderr
        deadline = time.monotonic() + 300  # the scheduler's first pass, on a busy machine
        while time.monotonic() < deadline and not any("sleep 600" in line for line in running_processes(root)):
            time.sleep(0.5)
        assert any("sleep 600" in line for line in running_processes(root)), running_processes(root)
        assert any("slurmstepd" in line for line in running_processes(root))
    finally:
        cluster.stop()
    assert running_processes(root) == []


def test_a_failed_start_leaves_nothing_running(tmp_path, monkeypatch):
    """A slurmd that cannot start (here /bin/false in its place) fails the start after munged and
    slurmctld are up; they are stopped before the error is raised."""
    from . import slurm_cluster

    real_find = slurm_cluster._find
    monkeypatch.setattr(
        slurm_cluster, "_find", lambda program: "/bin/false" if program == "slurmd" else real_find(program)
    )
    root = tmp_path / "cluster"
    cluster = LocalSlurmCluster(root, nodes=2)
    try:
        with pytest.raises(SlurmSetupError, match="slurmd-node[12] exited with status 1"):
            cluster.start(timeout=60)
        assert running_processes(root) == []
    finally:
        cluster.stop()


def test_the_script_for_people_starts_and_stops_a_cluster(tmp_path):
    script = REPO_ROOT / "scripts" / "local_slurm_cluster.sh"
    root = tmp_path / "cluster"
    started = subprocess.run(["bash", str(script), "start", str(root)], capture_output=True, text=True, timeout=600)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"export SLURM_CONF={root.resolve() / 'slurm.conf'}" in started.stdout
        env = LocalSlurmCluster(root).env()
        sinfo = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True, timeout=30
        )
        assert sinfo.stdout.split() == ["node1", "idle", "node2", "idle"], sinfo.stdout + sinfo.stderr
    finally:
        stopped = subprocess.run(["bash", str(script), "stop", str(root)], capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert running_processes(root) == []
