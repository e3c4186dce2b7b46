"""Runs the training command and records, for every training step of every process, the keys of
the samples it trained on (for tests/test_sharded_training.py). Nothing of the command is replaced:
`DecoderTrainer.train_step` is wrapped to append one JSON line per micro-batch to `$SAMPLE_TRACE.<rank>`.

    accelerate launch ... tests/sample_trace.py --config_file CFG.json

Optional, for the resume tests:
- `SAMPLE_TRACE_KILL_AT=N`: every process SIGKILLs its launcher and then itself when it is about to
  train the micro-batch after optimizer step N (a kill -9 of the whole run, with no stop handling:
  the launcher is killed first so that it cannot pass a SIGTERM on to the processes left);
- `SAMPLE_TRACE_WEIGHTS=PATH`: before the first training step, the decoder's weights (gathered whole
  from their shards, every process taking part) are written to PATH by the main process;
- `SAMPLE_TRACE_MIN_STEP_S=S`: every micro-batch takes at least S seconds (the rest slept, no CPU
  used), so that a test of what happens per interval of time sees several intervals per phase
  however fast the machine is.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _install() -> None:
    import torch

    from dalle2_decoder.training.sharding import plain
    from dalle2_decoder.training.trainer import DecoderTrainer

    original = DecoderTrainer.train_step
    target = os.environ["SAMPLE_TRACE"] + "." + os.environ.get("RANK", "0")
    kill_at = int(os.environ.get("SAMPLE_TRACE_KILL_AT", "-1"))
    weights_path = os.environ.get("SAMPLE_TRACE_WEIGHTS")
    min_step_s = float(os.environ.get("SAMPLE_TRACE_MIN_STEP_S", "0"))
    first = [True]

    def train_step(self, batch):
        if first[0] and weights_path:
            weights = {name: plain(t.detach()).cpu().clone() for name, t in self.decoder.state_dict().items()}
            if self.accelerator.is_main_process:
                torch.save({"step": self.step, "weights": weights}, weights_path)
        first[0] = False
        if self.step == kill_at and self.micro_step % self.grad_accum == 0:
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        started = time.monotonic()
        losses = original(self, batch)
        time.sleep(max(0.0, min_step_s - (time.monotonic() - started)))
        # the optimizer step this micro-batch counts towards (1-based), whatever the accumulation
        step = -(-self.micro_step // self.grad_accum)
        line = {"step": step, "micro_step": self.micro_step, "keys": list(batch["key"])}
        with open(target, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        return losses

    DecoderTrainer.train_step = train_step


if __name__ == "__main__":
    _install()
    from dalle2_decoder.cli import main

    sys.exit(main())
