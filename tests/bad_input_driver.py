"""Runs several command-line calls in one process and prints their results as JSON (for
tests/test_bad_inputs.py: cases that need a read-only or full filesystem run under `unshare` with
a mount of their own, and one process start then serves them all).

    python -m tests.bad_input_driver JOBS.json

Each job is `{"command": "train" | "evaluate" | "prepare", "argv": [...]}`, or
`{"command": "torch_save", "path": P, "bytes": N, "write_paths": [...]}`, which writes a tensor
of N bytes with torch.save and reports the failure as the commands do.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys


def run_job(job: dict) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if job["command"] == "train":
                from dalle2_decoder.cli import main

                code = main(job["argv"])
            elif job["command"] == "evaluate":
                from dalle2_decoder.evaluate import main

                code = main(job["argv"])
            elif job["command"] == "prepare":
                from dalle2_decoder.data.prepare import main

                code = main(job["argv"])
            else:
                import torch

                from dalle2_decoder.failures import guarded

                tensor = torch.zeros(job["bytes"] // 4)
                code = guarded(lambda: torch.save(tensor, job["path"]), write_paths=lambda: job["write_paths"])
        except SystemExit as exit_:
            code = exit_.code
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}


def main() -> None:
    with open(sys.argv[1]) as handle:
        jobs = json.load(handle)
    print(json.dumps([run_job(job) for job in jobs]))


if __name__ == "__main__":
    main()
