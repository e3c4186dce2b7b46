"""How long a stop takes: from the signal to the end of the process, for a stop in each phase.

    python bench/stop_latency.py [--repeats 3] [--config CFG.json]

Each round runs the training command through tests/stop_driver.py, which sends SIGTERM in the middle
of the chosen phase's work (during a U-Net evaluation, after the phase's second check), and measures
the seconds from the signal to the line that says the checkpoint is saved (the unit of work in
progress, then the save) and to the exit of the process (then the uploads, and the interpreter's
own shut-down: unloading torch takes seconds on a busy machine). Without --config it trains the
tests' small decoder (one 0.2M-parameter U-Net, 16px) on a small synthetic dataset. Printed: per
phase, the median and range over the repeats of both, and the size of the checkpoint written.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHASES = ("training", "validation", "evaluation", "sample grids")


def small_config(work: Path) -> dict:
    from tests.evaluation_fixtures import write_networks
    from tests.training_fixtures import tiny_config, write_tiny_demo

    data = write_tiny_demo(work / "demo")
    networks = write_networks(work / "networks")
    config = tiny_config(data, work / "run", epochs=1, epoch_samples=24, validation_samples=None)
    config["data"]["splits"] = {"train": 0.5, "val": 0.34, "test": 0.16}
    config["evaluate"] = {"n_evaluation_samples": 16, "FID": {"feature": networks["features"], "normalize": True}}
    config["tracker"]["log"]["auto_resume"] = False
    return config


def one_stop(config: dict, phase: str, work: Path) -> tuple:
    """(seconds from the signal to the saved line, to the exit, checkpoint bytes) of one run stopped in `phase`."""
    subprocess.run(["rm", "-rf", config["tracker"]["data_path"]], check=True)
    path = work / "config.json"
    path.write_text(json.dumps(config))
    report = work / "report"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "STOP_SIGNAL": "TERM",
        "STOP_PHASE": phase,
        "STOP_AFTER": "2",
        "STOP_REPORT": str(report),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.stop_driver", "train", "--config_file", str(path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    said = None
    for line in process.stdout:
        if said is None and "stopped by SIGTERM" in line:
            said = time.time()
    code = process.wait(timeout=1800)
    ended = time.time()
    sent = json.loads((report.with_name("report.0.json")).read_text())["sent_at"]
    if sent is None or said is None or code != 6:  # the stopped status
        raise SystemExit(f"the stop in {phase} did not happen as planned (exit {code})")
    latest = Path(config["tracker"]["data_path"]) / "latest.pth"
    return said - sent, ended - sent, latest.stat().st_size if latest.exists() else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", help="a training config of your own (its data_path is emptied each round)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dalle2-stop-latency-"))
    config = json.loads(Path(args.config).read_text()) if args.config else small_config(work)
    print(f"{'phase':<14} {'to saved s (min-max)':>22} {'to exit s (min-max)':>22} {'checkpoint MB':>14}")
    for phase in PHASES:
        results = [one_stop(config, phase, work) for _ in range(args.repeats)]
        size = max(b for *_, b in results) / 1e6
        columns = []
        for seconds in ([r[0] for r in results], [r[1] for r in results]):
            columns.append(f"{statistics.median(seconds):.2f} ({min(seconds):.2f}-{max(seconds):.2f})")
        print(f"{phase:<14} {columns[0]:>22} {columns[1]:>22} {size:14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
