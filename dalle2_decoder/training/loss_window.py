"""The window of training losses between two logged means: summed on the device, averaged over
ranks with one all-reduce when logged, and saved in a checkpoint so that a resumed run logs the
means of the same steps as a run never stopped."""

from __future__ import annotations

import time
from typing import Any, Dict, Mapping, Sequence

import torch
from accelerate import Accelerator


class LossWindow:
    """Each trained U-Net's loss summed over the steps since the last logged mean."""

    def __init__(self, trained_unets: Sequence[int], device: torch.device) -> None:
        self.trained_unets, self.device = list(trained_unets), device
        self.restore({})

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Start a window, from what a checkpoint saved of the one it stopped in (`state()`; empty: from zero)."""
        sums = saved.get("sums", {})
        self.loss_sums: Dict[int, torch.Tensor] = {
            n: torch.tensor(float(sums.get(str(n), 0.0)), device=self.device) for n in self.trained_unets
        }
        self.steps = int(saved.get("steps", 0))
        self.samples = int(saved.get("samples", 0))
        self.start = time.perf_counter()

    def state(self) -> Dict[str, Any]:
        """Plain values for a checkpoint (reads the sums back to the host); empty for an empty window."""
        if not self.steps:
            return {}
        return {
            "sums": {str(n): float(total) for n, total in self.loss_sums.items()},
            "steps": self.steps,
            "samples": self.samples,
        }

    def means(self, accelerator: Accelerator) -> Dict[int, float]:
        """Each U-Net's mean loss over the window and over the ranks (a collective: every rank calls it)."""
        numbers = sorted(self.loss_sums)
        stacked = torch.stack([self.loss_sums[n] / self.steps for n in numbers])
        averaged = accelerator.reduce(stacked, reduction="mean") if accelerator.num_processes > 1 else stacked
        return dict(zip(numbers, averaged.tolist()))

    def metrics(self, accelerator: Accelerator, lrs: Mapping[int, float], *, epoch: int, step: int) -> Dict[str, float]:
        """What the loop logs at the window's end (a collective): mean losses, learning rates, speed."""
        means = self.means(accelerator)
        metrics = {f"train/loss/unet{n}": v for n, v in means.items()}
        metrics.update({f"train/lr/unet{n}": lrs[n] for n in means})
        # (after a resume the window's first steps ran before it: the rate is approximate there)
        metrics["train/samples_per_s"] = self.samples / max(time.perf_counter() - self.start, 1e-9)
        metrics["epoch"] = epoch
        metrics["optimizer_steps"] = step
        return metrics
