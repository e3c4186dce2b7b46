"""Soak: short training runs on the demo data, killed at random moments, each followed by auto-resume.

    python bench/soak.py --kills 50            # writes under a temporary folder, prints the figures

Each round starts `train_decoder.py` on a tiny decoder (saves every few steps, locally and to the
loopback hub server of tests/tracking_servers.py, with `auto_resume`; validation, an FID evaluation
and sample grids every epoch) in a process group of its own, waits a random time, and sends SIGKILL,
SIGTERM, SIGINT or SIGUSR1, to the main process or to its whole group (dataloader workers included,
as SLURM, `timeout` and Ctrl-C send them), so signals fall in every phase: training, validation,
evaluation, sample grids, saving and uploading. After each round it checks:

- a clean stop (every signal but SIGKILL) exits with the "stopped" status and says in one line
  which phase it left, with no traceback; the figures count the phases the stops fell in;
- the latest checkpoint (`latest.pth`) always loads;
- after a clean stop no staging copy or pending upload remains; after a SIGKILL, the next start
  removes them (checked then);
- no process of the run's group outlives it;
- nothing outside the run's folders changed (the data folder and the config are hashed).

At the end the run is left to finish, and its final weights are compared with an uninterrupted
run of the same config (exact resume makes them equal). Figures: kills by signal, rounds that had
saved, stray copies found, mismatches, and the wall time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOKEN = "hf_soak_token_0123456789"


def tree_digest(folder: Path) -> Dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def make_config(data: Path, run: Path, hub_url: str, token_file: Path, networks: Dict[str, str]) -> dict:
    return {
        "seed": 1,
        "decoder": {
            "unets": [
                {
                    "dim": 8,
                    "image_embed_dim": 32,
                    "dim_mults": [1, 2],
                    "attn_heads": 2,
                    "attn_dim_head": 8,
                    "cond_dim": 16,
                    "num_resnet_blocks": 1,
                }
            ],
            "image_sizes": [16],
            "timesteps": 10,
            "learned_variance": False,
        },
        "data": {
            "webdataset_base_url": str(data / "shards") + "/{}.tar",
            "img_embeddings_url": str(data / "img_emb"),
            "num_workers": 1,
            "batch_size": 4,
            "start_shard": 0,
            "end_shard": 7,
            "shard_width": 6,
            "index_width": 4,
            "splits": {"train": 0.75, "val": 0.125, "test": 0.125},
        },
        "train": {
            "epochs": 3,
            "lr": 1e-3,
            "device": "cpu",
            "epoch_samples": 64,
            "validation_samples": 8,
            "save_every_n_samples": 16,
            "n_sample_images": 2,
        },
        "evaluate": {"n_evaluation_samples": 8, "FID": {"feature": networks["features"], "normalize": True}},
        "tracker": {
            "data_path": str(run),
            "log": {"log_type": "console", "auto_resume": True},
            "save": [
                {"save_to": "local", "save_latest_to": "latest.pth", "save_best_to": "best.pth"},
                {
                    "save_to": "huggingface",
                    "huggingface_repo": "soak/decoder",
                    "huggingface_endpoint": hub_url,
                    "token_path": str(token_file),
                    "save_latest_to": "latest.pt",
                },
            ],
        },
    }


PHASES = ("training", "validation", "evaluation", "sample grids")


def start(config_file: Path, log: Path, stop: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    """The training command in a process group of its own (its dataloader workers join it).

    `stop`: run it through tests/stop_driver.py, which sends a stop signal in the middle of a
    chosen phase (its STOP_* settings); otherwise the plain command, for SIGKILLs at random times.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    command = [sys.executable, str(REPO / "train_decoder.py"), "--config_file", str(config_file)]
    if stop is not None:
        env.update(stop)
        command = [sys.executable, "-m", "tests.stop_driver", "train", "--config_file", str(config_file)]
    handle = open(log, "wb")
    return subprocess.Popen(
        command,
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO if stop is not None else config_file.parent,
        start_new_session=True,
    )


STOP_LINE = re.compile(rb"stopped by (SIG\w+) during ([a-z ]+?)(?: of epoch \d+)? \(")
"""The one line of a clean stop: the signal and the phase it cut short."""


def leftover_processes(config_file: Path, exclude: int) -> list:
    """Processes still running this config (e.g. dataloader workers orphaned by a kill)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != exclude:
            try:
                if str(config_file).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def finished(run: Path) -> bool:
    state = run / "run_state.json"
    return state.exists() and json.loads(state.read_text()).get("finished") is True


def strays(run: Path):
    return sorted(run.glob(".staging/step_*")) + sorted(run.glob("uploads/*/pending/step_*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-wait", type=float, default=20.0, help="longest wait after start-up before the signal, seconds"
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=0.0,
        help="stop sending signals after this many minutes (then the final comparison), 0: no limit",
    )
    parser.add_argument("--keep", help="work in this folder (kept) instead of a temporary one")
    args = parser.parse_args()
    from dalle2_decoder.failures import EXIT_STOPPED
    from dalle2_decoder.tracking import read_file
    from tests.evaluation_fixtures import write_networks
    from tests.tracking_servers import HubServer

    chooser = random.Random(args.seed)
    work = Path(args.keep or tempfile.mkdtemp(prefix="dalle2-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "demo"
    if not (data / "data_config.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "dalle2_decoder.data.demo",
                "--out",
                str(data),
                "--num-images",
                "256",
                "--image-size",
                "16",
                "--embed-dim",
                "32",
                "--shard-size",
                "32",
            ],
            check=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL,
        )
    token_file = work / "hub_token"
    token_file.write_text(TOKEN)
    networks = write_networks(work / "networks")
    figures = {
        "kills": {"SIGKILL": 0, "SIGTERM": 0, "SIGINT": 0, "SIGUSR1": 0},
        "to_group": 0,
        "aimed_at_phase": {},
        "stopped_in_phase": {},
        "finished_early": 0,
        "latest_loads": 0,
        "no_latest_yet": 0,
        "strays_after_clean_stop": 0,
        "strays_left_after_restart": 0,
        "outside_changed": 0,
        "leftover_processes": 0,
        "completed_runs": 0,
        "failures": [],
    }
    began = time.time()
    with HubServer(work / "hub", token=TOKEN) as hub:
        run, baseline_run = work / "run", work / "baseline"
        config_file, baseline_file = work / "soak.json", work / "baseline.json"
        config_file.write_text(json.dumps(make_config(data, run, hub.url, token_file, networks), indent=2))
        baseline_file.write_text(json.dumps(make_config(data, baseline_run, hub.url, token_file, networks), indent=2))
        outside_before = tree_digest(data), config_file.read_bytes()

        rounds = 0
        stop_at = began + args.minutes * 60 if args.minutes else float("inf")
        while sum(figures["kills"].values()) < args.kills and time.time() < stop_at:
            rounds += 1
            if finished(run):  # the last signal came after the run's end: start a new run in a fresh folder
                figures["completed_runs"] += 1
                subprocess.run(["rm", "-rf", str(run)], check=True)
            left_before = strays(run)
            log = work / "logs" / f"round_{rounds:03d}.log"
            log.parent.mkdir(exist_ok=True)
            name = chooser.choice(["SIGKILL", "SIGTERM", "SIGINT", "SIGUSR1"])
            to_group = chooser.random() < 0.5
            wait = 0.0
            if name == "SIGKILL":  # at a random moment: during a step, a save, an upload ...
                process = start(config_file, log)
                ready_by = time.time() + 600
                while (
                    process.poll() is None
                    and time.time() < ready_by
                    and b"dalle2-decoder training" not in log.read_bytes()
                ):
                    time.sleep(0.1)
                wait = chooser.uniform(0.5, args.max_wait)
                deadline = time.time() + wait
                while time.time() < deadline and process.poll() is None:
                    time.sleep(0.05)
                if process.poll() is None:
                    if to_group:
                        os.killpg(process.pid, signal.SIGKILL)
                    else:
                        process.kill()
            else:  # in the middle of a chosen phase's work, sent by the driver to the process or its group
                phase = chooser.choice(PHASES)
                stop = {
                    "STOP_SIGNAL": name[3:],
                    "STOP_PHASE": phase,
                    "STOP_AFTER": str(chooser.randint(1, 3)),
                    "STOP_TARGET": "group" if to_group else "self",
                }
                process = start(config_file, log, stop)
                figures["aimed_at_phase"][phase] = figures["aimed_at_phase"].get(phase, 0) + 1
            figures["to_group"] += to_group
            try:
                code = process.wait(timeout=900)
            except subprocess.TimeoutExpired:
                process.kill()
                figures["failures"].append(f"round {rounds}: {name} did not stop the run in 900 s")
                break
            if code == 0:  # the run ended before the signal (or the phase aimed at) came: start over
                figures["finished_early"] += 1
                subprocess.run(["rm", "-rf", str(run)], check=True)
                continue
            if name == "SIGKILL" and code != -signal.SIGKILL:
                figures["failures"].append(f"round {rounds}: exit {code} before the SIGKILL, see {log}")
                break
            figures["kills"][name] += 1
            output = log.read_bytes()
            if name != "SIGKILL":
                said = STOP_LINE.findall(output)
                phase = said[0][1].decode() if len(said) == 1 else "?"
                figures["stopped_in_phase"][phase] = figures["stopped_in_phase"].get(phase, 0) + 1
                if code != EXIT_STOPPED:
                    figures["failures"].append(f"round {rounds}: {name} gave exit status {code}, see {log}")
                if len(said) != 1 or b"Traceback" in output:
                    figures["failures"].append(f"round {rounds}: {name} did not stop in one clean line, see {log}")
            if left_before and any(path.exists() for path in left_before):
                figures["strays_left_after_restart"] += 1
            if (run / "latest.pth").exists():
                try:
                    read_file(run / "latest.pth")
                    figures["latest_loads"] += 1
                except Exception as error:  # the point of the soak: report, keep going
                    figures["failures"].append(f"round {rounds}: latest.pth does not load after {name}: {error}")
            else:
                figures["no_latest_yet"] += 1
            if name != "SIGKILL" and strays(run):
                figures["strays_after_clean_stop"] += 1
            # dataloader workers of a killed process check their parent every 5 s: give them 10
            grace_until = time.time() + 10.0
            orphans = leftover_processes(config_file, exclude=process.pid)
            while (orphans or group_alive(process.pid)) and time.time() < grace_until:
                time.sleep(0.5)
                orphans = leftover_processes(config_file, exclude=process.pid)
            if group_alive(process.pid) and not orphans:
                orphans = [f"group {process.pid}"]
            if orphans:
                figures["leftover_processes"] += 1
                figures["failures"].append(f"round {rounds}: processes left running after {name}: {orphans}")
                for pid in orphans:
                    if isinstance(pid, int):
                        os.kill(pid, signal.SIGKILL)
                if group_alive(process.pid):
                    os.killpg(process.pid, signal.SIGKILL)
            if (tree_digest(data), config_file.read_bytes()) != outside_before:
                figures["outside_changed"] += 1
            where = "group" if to_group else "process"
            print(f"round {rounds}: {name} to the {where} after {wait:.1f}s, exit {code}", flush=True)

        # let the interrupted run finish, then compare with an uninterrupted one
        final = None if finished(run) else start(config_file, work / "logs" / "final.log")
        baseline = start(baseline_file, work / "logs" / "baseline.log")  # side by side: same config, own folder
        final_code, baseline_code = (final.wait() if final else 0), baseline.wait()
        equal = None
        if final_code == 0 and baseline_code == 0:
            import torch

            a = read_file(run / "latest.pth").state["trainer"]["decoder"]
            b = read_file(baseline_run / "latest.pth").state["trainer"]["decoder"]
            equal = a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
        else:
            figures["failures"].append(f"final run exit {final_code}, baseline exit {baseline_code}")
        if strays(run):
            figures["failures"].append(f"stray copies after the final run: {strays(run)}")
    figures["final_weights_equal_uninterrupted"] = equal
    figures["rounds"] = rounds
    figures["wall_s"] = round(time.time() - began, 1)
    print(json.dumps(figures, indent=2))
    problems = (
        figures["failures"]
        or figures["strays_after_clean_stop"]
        or figures["strays_left_after_restart"]
        or figures["outside_changed"]
        or equal is not True
    )
    print("soak:", "FAILED" if problems else "passed", f"({sum(figures['kills'].values())} kills, work folder {work})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
