"""Loggers: where metrics and sample images go. Built by `create_tracker` from `tracker.log`.

- `ConsoleLogger`: one readable line per `log` call on stdout, every call appended to
  `data_path/metrics.jsonl`, sample grids as PNG under `data_path/samples/` with their captions
  (drawn under each image, in a JSON file beside each PNG and in the PNG's text metadata).
- `TensorboardLogger`: all of that, and TensorBoard event files under `data_path/tensorboard/`.
- `WandbLogger`: the same lines on stdout, and metrics, images with captions and the config in a
  wandb run (online or offline, as wandb's own settings say).

The x-axis everywhere is the `step` the tracker is given: the training loop gives training samples
seen (summed over processes), so console lines and `metrics.jsonl` name it `samples seen` /
`samples_seen`, and it is wandb's step and TensorBoard's global step (docs/TRACKING.md).
"""

from __future__ import annotations

import datetime
import json
import math
import re
import secrets
import string
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .grids import captioned_grid, upscale

ImagesLike = Union[torch.Tensor, Sequence[Any]]


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float as the string "nan", "inf" or "-inf": strict JSON (no bare
    NaN, which JSON parsers reject) that still says what the value was (docs/TRACKING.md)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


X_AXIS = "samples_seen"
"""What the tracker's `step` counts (the training loop's training samples seen), as `metrics.jsonl` names it."""


def format_metrics(metrics: Mapping[str, Any], step: int) -> str:
    """`samples seen 1200 | loss/unet1 0.03121 | lr 0.0001`: one line, keys in the order given."""
    parts = [f"samples seen {step}"]
    for key, value in metrics.items():
        value = _scalar(value)
        if isinstance(value, float):
            text = f"{value:.4g}" if math.isfinite(value) else str(value)
        else:
            text = str(value)
        parts.append(f"{key} {text}")
    return " | ".join(parts)


def to_uint8_images(images: ImagesLike) -> List[np.ndarray]:
    """Images as a list of HxWx3 uint8 arrays.

    Accepts a (B, C, H, W) float tensor in [0, 1], or a list of (C, H, W) float tensors (sizes may
    differ, e.g. one per U-Net), HxWxC uint8 arrays or PIL images.
    """
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be a (B, C, H, W) tensor, got shape {tuple(images.shape)}")
        images = list(images)
    arrays = []
    for index, image in enumerate(images):
        if isinstance(image, torch.Tensor):
            if image.dim() != 3:
                raise ValueError(f"image {index} must be (C, H, W), got shape {tuple(image.shape)}")
            image = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
            array = image.permute(1, 2, 0).numpy()
        else:
            array = np.asarray(image)
            if array.dtype != np.uint8:
                raise ValueError(f"image {index}: arrays must be uint8 HxWxC, got {array.dtype}")
        if array.ndim == 2:
            array = array[:, :, None]
        if array.shape[2] == 1:
            array = np.repeat(array, 3, axis=2)
        arrays.append(np.ascontiguousarray(array[:, :, :3]))
    return arrays


def _check_captions(images: List[np.ndarray], captions: Optional[Sequence[str]]) -> List[str]:
    if captions is None:
        return [""] * len(images)
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    return [str(caption) for caption in captions]


def _safe_relative(name: str) -> Path:
    parts = [re.sub(r"[^A-Za-z0-9_.-]+", "_", part) for part in name.split("/")]
    return Path(*[part for part in parts if part not in ("", ".", "..")] or ["images"])


class ConsoleLogger:
    """Metric lines on stdout, metrics in `metrics.jsonl`, sample grids as PNG, all under `data_path`."""

    def __init__(self, data_path: Path):
        self.data_path = Path(data_path)
        self.metrics_path = self.data_path / "metrics.jsonl"
        self.samples_path = self.data_path / "samples"

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        print(format_metrics(metrics, step), flush=True)
        record = {X_AXIS: step, "time": datetime.datetime.now().isoformat(timespec="seconds")}
        record.update({key: _scalar(value) for key, value in metrics.items()})
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(json_safe(record), default=str, allow_nan=False) + "\n")

    def log_images(self, name: str, images: List[np.ndarray], captions: Optional[Sequence[str]], step: int) -> Path:
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        captions = _check_captions(images, captions)
        folder = self.samples_path / _safe_relative(name)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"step_{step:09d}"
        caption_record = {"name": name, X_AXIS: step, "captions": captions}
        info = PngInfo()
        info.add_text("captions", json.dumps(captions))
        png_path = folder / f"{stem}.png"
        Image.fromarray(captioned_grid(images, captions)).save(png_path, pnginfo=info)
        (folder / f"{stem}.json").write_text(json.dumps(caption_record, indent=2) + "\n")
        print(f"samples seen {step} | {name}: {len(images)} images written to {png_path}", flush=True)
        return png_path

    def finish(self, success: bool) -> None:
        pass


class TensorboardLogger(ConsoleLogger):
    """What the console logger writes, and TensorBoard event files under `data_path/tensorboard/`.

    `purge_step`: an auto-resumed run's checkpoint step; TensorBoard then discards what the
    interrupted run logged from that step on, so a resumed run's curves do not double back.
    """

    def __init__(self, data_path: Path, *, purge_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(data_path)
        self.log_dir = self.data_path / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        super().log(metrics, step)
        for key, value in metrics.items():
            value = _scalar(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a run killed later keeps what it logged

    def log_images(self, name: str, images: List[np.ndarray], captions: Optional[Sequence[str]], step: int) -> Path:
        png_path = super().log_images(name, images, captions, step)
        from PIL import Image

        with Image.open(png_path) as grid:
            pixels = np.asarray(grid.convert("RGB"))
        self.writer.add_image(name, pixels, global_step=step, dataformats="HWC")
        listed = "\n".join(f"{index + 1}. {caption}" for index, caption in enumerate(_check_captions(images, captions)))
        self.writer.add_text(f"{name}/captions", listed, global_step=step)
        self.writer.flush()
        return png_path

    def log_config(self, config: Mapping[str, Any], step: int) -> None:
        """The resolved config (secrets masked) as text, in a code block TensorBoard shows as it is."""
        text = json.dumps(json_safe(dict(config)), indent=2, default=str)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), global_step=step)
        self.writer.flush()

    def finish(self, success: bool) -> None:
        self.writer.close()


def generate_run_id() -> str:
    """An 8-character lowercase id, the shape wandb uses for its own ids."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class WandbLogger:
    """Metrics, images and the config in a wandb run; metric lines on stdout as well."""

    def __init__(
        self,
        *,
        entity: str,
        project: str,
        run_name: Optional[str],
        run_id: str,
        resume: Optional[str],
        config: Dict[str, Any],
        wandb_dir: Optional[Path],
    ):
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            entity=entity,
            project=project,
            name=run_name,
            id=run_id,
            resume=resume,
            config=config,
            dir=str(wandb_dir) if wandb_dir is not None else None,
        )
        self.run_id: str = self.run.id
        self.run_path = f"{entity}/{project}/{self.run.id}"

    @property
    def files_dir(self) -> Path:
        """The run's local files folder (what `run.save` uploads, or what `wandb sync` uploads offline)."""
        return Path(self.run.dir)

    @property
    def offline(self) -> bool:
        return bool(self.run.offline)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        print(format_metrics(metrics, step), flush=True)
        self.run.log({key: _scalar(value) for key, value in metrics.items()}, step=step)

    def log_images(self, name: str, images: List[np.ndarray], captions: Optional[Sequence[str]], step: int) -> None:
        captions = _check_captions(images, captions)
        media = [self._wandb.Image(upscale(image), caption=caption) for image, caption in zip(images, captions)]
        self.run.log({name: media}, step=step)

    def finish(self, success: bool) -> None:
        self.run.finish(exit_code=0 if success else 1)
