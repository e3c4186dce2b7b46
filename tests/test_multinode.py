"""Two "nodes" without SLURM: two `accelerate launch` on this host meeting at 127.0.0.1 (gloo, CPU).

Each launcher is what one node of a cluster runs (`--num_machines 2 --machine_rank 0/1`, the
shipped multi_node.yaml). Global ranks decide data shards, logging and saving; each node's local
ranks only count its own processes. A node that dies must make the other exit with an error,
not hang.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

from dalle2_decoder.tracking import read_file

from .conftest import REPO_ROOT
from .slurm_cluster import _alive, _tree, free_ports
from .training_fixtures import tiny_config, write_tiny_demo

pytestmark = pytest.mark.slow

DEAD_NODE_BOUND_S = 90
"""A surviving node must be gone this long after the other died (measured: a few seconds; see docs)."""


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_tiny_demo(tmp_path_factory.mktemp("demo"))


def launch_nodes(config: Path, folder: Path, per_node: int) -> List[subprocess.Popen]:
    port = free_ports(1)[0]
    nodes = []
    for rank in (0, 1):
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO_ROOT / "accelerate_configs" / "multi_node.yaml"),
            "--num_machines",
            "2",
            "--num_processes",
            str(2 * per_node),
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            str(REPO_ROOT / "train_decoder.py"),
            "--config_file",
            str(config),
        ]
        log = open(folder / f"node{rank}.log", "w")
        nodes.append(
            subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=folder,
                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)},
            )
        )
        log.close()
    return nodes


def node_output(folder: Path, rank: int) -> str:
    return (folder / f"node{rank}.log").read_text(errors="replace")


def kill_node(process: subprocess.Popen) -> None:
    """What a node failure does: the launcher and every process under it die at once."""
    for pid in _tree(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def end_all(nodes: List[subprocess.Popen]) -> None:
    for process in nodes:
        if process.poll() is None:
            kill_node(process)
        process.wait(timeout=30)


@pytest.mark.parametrize("per_node", [1, 2])
def test_two_launchers_train_as_one_job_with_global_ranks(demo_data, tmp_path, per_node):
    world = 2 * per_node
    data_path = tmp_path / "run"
    # Two steps an epoch on every rank (batch 4); 4 of the 6 shards train, one per rank at 4 ranks.
    raw = tiny_config(
        demo_data, data_path, epochs=2, epoch_samples=8 * world, validation_samples=None, save_every_n_samples=10_000
    )
    raw["data"]["splits"] = {"train": 0.67, "val": 0.17, "test": 0.16}
    raw["tracker"]["log"]["auto_resume"] = False
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw))
    nodes = launch_nodes(config, tmp_path, per_node)
    try:
        codes = [process.wait(timeout=600) for process in nodes]
    finally:
        end_all(nodes)
    main, other = node_output(tmp_path, 0), node_output(tmp_path, 1)
    assert codes == [0, 0], main + other
    # One job of `world` processes: the global main process (node 0, local rank 0) alone prints,
    # logs and saves; node 1's local main process does none of it.
    assert f"processes      {world} (MULTI_CPU)" in main
    assert main.count("dalle2-decoder training") == 1 and "dalle2-decoder training" not in other
    assert "images written" in main and "images written" not in other
    assert f"parameters identical across {world} processes" in main
    # Global ranks: node 0 holds ranks 0..per_node-1, node 1 the rest; each reads its own shard slice.
    for rank in range(world):
        where = main if rank < per_node else other
        assert f"process {rank + 1} of {world} finished" in where, where
        assert f"data (train, rank {rank}, epoch 1)" in where
    lines = [json.loads(line) for line in (data_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["samples_seen"] for line in lines if "val/loss/unet1" in line] == [8 * world, 16 * world]
    latest = read_file(data_path / "latest.pth")
    assert latest.state["progress"]["samples_seen"] == 16 * world and len(latest.state["rng"]) == world


def test_a_dead_node_makes_the_other_exit_with_an_error_in_bounded_time(demo_data, tmp_path):
    data_path = tmp_path / "run"
    raw = tiny_config(demo_data, data_path, epochs=1000, epoch_samples=48, save_every_n_samples=10_000)
    raw["tracker"]["log"]["auto_resume"] = False
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw))
    nodes = launch_nodes(config, tmp_path, per_node=1)
    try:
        deadline = time.monotonic() + 300
        while "val/loss/unet1" not in node_output(tmp_path, 0):  # training for an epoch: well past rendezvous
            assert time.monotonic() < deadline and nodes[0].poll() is None, node_output(tmp_path, 0)
            time.sleep(0.2)
        survivors = _tree(nodes[0].pid)
        killed_at = time.monotonic()
        kill_node(nodes[1])
        code = nodes[0].wait(timeout=DEAD_NODE_BOUND_S)
        took = time.monotonic() - killed_at
        # Every process of the surviving node is gone, not only its launcher.
        while any(_alive(pid) for pid in survivors) and time.monotonic() - killed_at < DEAD_NODE_BOUND_S:
            time.sleep(0.2)
    finally:
        end_all(nodes)
    output = node_output(tmp_path, 0)
    print(f"surviving node exited {took:.1f} s after the other died (status {code})")
    assert code != 0, output
    assert not any(_alive(pid) for pid in survivors)
    assert "lost contact with another process" in output, output[-3000:]
