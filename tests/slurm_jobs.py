"""Helpers of the SLURM tests: the cluster fixture, a job config, submitting the shipped sbatch script."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import attrs
import pytest

from dalle2_decoder.tracking import read_file

from .conftest import REPO_ROOT
from .slurm_cluster import LocalSlurmCluster, free_ports, running_processes
from .training_fixtures import tiny_config

SBATCH = REPO_ROOT / "accelerate_configs" / "slurm_multi_node.sbatch"
JOB_TIMEOUT = 600


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """Two nodes on this host; stopped (with whatever still runs on it) when the module's tests end."""
    root = tmp_path_factory.mktemp("slurm")
    cluster = LocalSlurmCluster(root, nodes=2).start()
    try:
        yield cluster
    finally:
        cluster.stop()
    assert running_processes(root) == [], "the cluster left processes running"


def job_config(data: Dict[str, Any], data_path: Path, folder: Path, **train) -> Path:
    config = tiny_config(data, data_path, **train)
    config["tracker"]["log"]["auto_resume"] = True  # what a requeued job relies on
    config["tracker"]["progress_interval_s"] = 1.0  # a progress line a second in the job's output, to follow it
    path = folder / f"{data_path.name}.json"
    path.write_text(json.dumps(config, indent=2))
    return path


@attrs.define
class Job:
    job_id: str
    output_path: Path
    returncode: Optional[int] = None
    info: Dict[str, str] = attrs.Factory(dict)

    @property
    def output(self) -> str:
        return self.output_path.read_text(errors="replace") if self.output_path.exists() else ""


def sbatch_command(output: Path, config: Path) -> list:
    """The shipped script as a user submits it, with this cluster's sizes given on the command line
    (which override the script's #SBATCH lines): no GPUs, one CPU process per node."""
    env = ",".join(
        [
            "ALL",
            f"VENV={sys.prefix}",  # the script activates it
            "GPUS_PER_NODE=1",
            f"MAIN_PROCESS_PORT={free_ports(1)[0]}",
            "OMP_NUM_THREADS=1",  # two nodes share this host's cores
            f"PYTHONPATH={REPO_ROOT}",
        ]
    )
    return [
        "sbatch",
        "--parsable",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        f"--output={output}",
        f"--export={env}",
        str(SBATCH),
        str(config),
    ]


def submit(cluster: LocalSlurmCluster, config: Path, folder: Path, *, wait: bool = True) -> Job:
    """Submit the sbatch script from the repository root (as its usage says); with `wait`, `sbatch --wait`."""
    output = folder / f"{config.stem}-%j.out"
    command = sbatch_command(output, config)
    if wait:
        command.insert(1, "--wait")
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    job_id = process.stdout.readline().strip().split(";")[0]
    job = Job(job_id=job_id, output_path=Path(str(output).replace("%j", job_id)))
    if not wait:
        return job
    _, errors = process.communicate(timeout=JOB_TIMEOUT)
    job.returncode = process.returncode
    job.info = job_info(cluster, job_id)
    if not job_id:
        raise AssertionError(f"sbatch failed: {errors}")
    return job


def job_info(cluster: LocalSlurmCluster, job_id: str) -> Dict[str, str]:
    result = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], env=cluster.env(), capture_output=True, text=True, timeout=30
    )
    return dict(item.split("=", 1) for item in result.stdout.split() if "=" in item)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def final_weights(data_path: Path) -> Dict[str, Any]:
    return read_file(data_path / "latest.pth").state["trainer"]["decoder"]
