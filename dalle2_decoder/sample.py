"""Sample images from a trained decoder: `dalle2-sample-decoder` / `python -m dalle2_decoder.sample`.

    dalle2-sample-decoder --model MODEL --images DIR --out OUT          # image variations through CLIP
    dalle2-sample-decoder --model MODEL --embeddings E.npy [--text_encodings T.npy] --out OUT
    dalle2-sample-decoder --model MODEL --test_split [--config_file CFG.json] --out OUT
    accelerate launch -m dalle2_decoder.sample ...                      # inputs split across processes

MODEL is anything `load_decoder` takes: a checkpoint or model save, a URL, or a hub repo id. OUT
receives one PNG per (input, seed) under `images/`, `grid.png` (one row per input) and
`samples.json` saying what made each image. An image depends only on its input and its seed (each
sample draws its noise from its own generator), not on the batch size or the number of processes.
Exit statuses follow the other commands' (see docs/SAMPLING.md): 0 done, 2 usage (bad options or
inputs), 3 data, 4 the model cannot be loaded, 5 environment (CLIP, device), 6 stopped by a signal
(the images written so far are whole and listed in samples.json), 70 a bug (with its traceback);
each problem is one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .common.files import atomic_write_text
from .common.per_unet import per_unet
from .failures import UsageError

EXIT_OK = 0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class SampleInputError(UsageError):
    """The options or inputs cannot be used (missing, unreadable, or not fitting the decoder)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalle2-sample-decoder", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        required=True,
        metavar="SOURCE",
        help="checkpoint or model save (.pth/.pt/.safetensors), a folder, an http(s) URL, or a hub repo id",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="a folder of images: sample variations of each through CLIP")
    source.add_argument("--embeddings", metavar="FILE.npy", help="a .npy of image embeddings (N, D)")
    source.add_argument(
        "--test_split",
        "--test-split",
        dest="test_split",
        action="store_true",
        help="the test split of the run's data (its config from --config_file, else the one in the save)",
    )
    parser.add_argument(
        "--text_encodings",
        "--text-encodings",
        dest="text_encodings",
        metavar="FILE.npy",
        help="with --embeddings: text encodings (N, L, W) or pooled text embeddings (N, W)",
    )
    parser.add_argument(
        "--config_file",
        "--config-file",
        dest="config_file",
        metavar="PATH",
        help="run config whose data (and decoder.clip) to use instead of the one recorded in the save",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="S", help="the seeds of each input's samples")
    parser.add_argument("--seed", type=int, default=0, help="first seed when --seeds is not given (default 0)")
    parser.add_argument(
        "--num_per_input",
        "--num-per-input",
        dest="num_per_input",
        type=int,
        default=1,
        metavar="N",
        help="samples per input, seeds --seed .. --seed + N - 1 (default 1)",
    )
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N inputs")
    parser.add_argument(
        "--cond_scale",
        "--cond-scale",
        dest="cond_scale",
        type=float,
        nargs="+",
        default=[1.0],
        metavar="S",
        help="classifier-free guidance scale, one for all U-Nets or one per U-Net",
    )
    from .models.samplers import SAMPLER_NAMES

    parser.add_argument(
        "--sampler",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"sampler, one for all U-Nets or one per U-Net: {', '.join(SAMPLER_NAMES)} (default: the config's)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="sampling steps (network calls), one for all U-Nets or one per U-Net (default: the config's)",
    )
    parser.add_argument(
        "--batch_size",
        "--batch-size",
        dest="batch_size",
        type=int,
        default=16,
        metavar="B",
        help="images sampled at once per process (default 16)",
    )
    parser.add_argument(
        "--stop_at_unet",
        "--stop-at-unet",
        dest="stop_at_unet",
        type=int,
        default=None,
        metavar="N",
        help="stop after U-Net N (numbered from 1; default: the last)",
    )
    parser.add_argument(
        "--no_ema",
        "--no-ema",
        dest="no_ema",
        action="store_true",
        help="use a checkpoint's trained weights instead of its EMA weights",
    )
    parser.add_argument("--device", default=None, help="single-process device (default: cuda when available, else cpu)")
    from .config.decoder import CLIP_MAKES

    parser.add_argument(
        "--clip_make", "--clip-make", dest="clip_make", default=None, help=f"CLIP for --images: {', '.join(CLIP_MAKES)}"
    )
    parser.add_argument(
        "--clip_model",
        "--clip-model",
        dest="clip_model",
        default=None,
        help="CLIP model for --images (default: the config's decoder.clip)",
    )
    parser.add_argument(
        "--clip_pretrained",
        "--clip-pretrained",
        dest="clip_pretrained",
        default=None,
        help="CLIP weights file or pretrained tag for --images",
    )
    parser.add_argument("--endpoint", default=None, help="hub endpoint for a hub repo id (default: the hub client's)")
    parser.add_argument("--token", default=None, help="hub token (default: the hub client's login or HF_TOKEN)")
    parser.add_argument("--cache_dir", "--cache-dir", dest="cache_dir", default=None, help="download cache folder")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the full traceback of errors too (they are one line each without it)",
    )
    return parser


@dataclass
class Inputs:
    """What to sample from: one row per input."""

    ids: List[str]
    image_embed: Any  # (N, D) float tensor, CPU
    text_encodings: Any = None  # (N, L, W) or None
    text_mask: Any = None  # (N, L) bool or None
    kind: str = ""


def _seeds(args) -> List[int]:
    if args.seeds:
        if len(set(args.seeds)) != len(args.seeds):
            raise SampleInputError(f"--seeds repeats a seed ({args.seeds}): each would give the same image")
        return list(args.seeds)
    if args.num_per_input < 1:
        raise SampleInputError("--num_per_input must be at least 1")
    return list(range(args.seed, args.seed + args.num_per_input))


def _per_unet(values: Optional[Sequence], count: int, option: str) -> Optional[list]:
    """An option given on the command line once (for every U-Net) or once per U-Net."""
    if values is None:
        return None
    if len(values) not in (1, count):
        raise SampleInputError(
            f"{option} has {len(values)} values but the decoder has {count} U-Nets; give one or one per U-Net"
        )
    return per_unet(values[0] if len(values) == 1 else list(values), count, name=option)


# --- inputs --------------------------------------------------------------------------------------


def _load_npy(path: str, option: str):
    import numpy as np
    import torch

    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise SampleInputError(f"{option}: file not found: {path}") from None
    except (OSError, ValueError) as error:
        raise SampleInputError(f"{option}: {path} is not a readable .npy file ({error})") from None
    if not np.issubdtype(array.dtype, np.number):
        raise SampleInputError(f"{option}: {path} holds {array.dtype}, not numbers")
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


def embeddings_inputs(args, decoder) -> Inputs:
    embeds = _load_npy(args.embeddings, "--embeddings")
    if embeds.dim() == 1:
        embeds = embeds[None]
    want = decoder.unets[0].config["image_embed_dim"]
    if embeds.dim() != 2 or embeds.shape[1] != want:
        raise SampleInputError(
            f"--embeddings: {args.embeddings} has shape {tuple(embeds.shape)}; the decoder takes (N, {want})"
        )
    text = mask = None
    if args.text_encodings:
        text = _load_npy(args.text_encodings, "--text_encodings")
        if text.dim() == 2:
            text = text[:, None]  # pooled text embeddings: one context token each, as in training
        if text.dim() != 3 or text.shape[0] != embeds.shape[0]:
            raise SampleInputError(
                f"--text_encodings: {args.text_encodings} has shape {tuple(text.shape)}; "
                f"expected ({embeds.shape[0]}, L, W) to go with the {embeds.shape[0]} embeddings"
            )
        mask = text.abs().sum(-1) > 0  # zero rows are padding
    width = len(str(max(0, embeds.shape[0] - 1)))
    return Inputs([f"row{i:0{width}d}" for i in range(embeds.shape[0])], embeds, text, mask, "embeddings")


def _clip_config(args, run_config: Dict[str, Any]):
    from .config.decoder import ClipConfig

    recorded = (run_config.get("decoder") or {}).get("clip") or {}
    if args.config_file:
        from .config import TrainDecoderConfig

        clip = TrainDecoderConfig.from_json_path(args.config_file).decoder.clip
        recorded = (
            {}
            if clip is None
            else {"make": clip.make, "model": clip.model, "pretrained": clip.pretrained, "cache_dir": clip.cache_dir}
        )
    options = {key: value for key, value in recorded.items() if value is not None}
    for key, value in (("make", args.clip_make), ("model", args.clip_model), ("pretrained", args.clip_pretrained)):
        if value is not None:
            options[key] = value
    if "model" not in options:
        raise SampleInputError(
            "--images needs CLIP: the decoder's config has no decoder.clip; give --clip_model "
            "(and --clip_make / --clip_pretrained)"
        )
    return ClipConfig(**options)


def image_folder_inputs(args, decoder, run_config, device) -> Inputs:
    import torch
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import pil_to_tensor

    from .clip import create_clip

    folder = Path(args.images)
    if not folder.is_dir():
        raise SampleInputError(f"--images: {folder} is not a folder")
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    if args.limit is not None:
        files = files[: args.limit]
    if not files:
        raise SampleInputError(f"--images: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    clip = create_clip(_clip_config(args, run_config), device=device)
    want = decoder.unets[0].config["image_embed_dim"]
    if clip.image_embed_dim != want:
        raise SampleInputError(
            f"CLIP gives {clip.image_embed_dim}-dimensional image embeddings but the decoder takes {want}"
        )
    embeds = []
    for path in files:
        try:
            with Image.open(path) as image:
                pixels = pil_to_tensor(image.convert("RGB")).float().div(255)
        except (OSError, UnidentifiedImageError) as error:
            raise SampleInputError(f"--images: cannot read {path} ({error})") from None
        embeds.append(clip.embed_images(pixels[None].to(device)).cpu())
    return Inputs([path.stem for path in files], torch.cat(embeds), kind="images")


def run_config_for(args, run_config: Dict[str, Any]):
    """The full run config for --test_split: --config_file, else the one recorded in the save."""
    from .config import ConfigError, TrainDecoderConfig

    if args.config_file:
        return TrainDecoderConfig.from_json_path(args.config_file)
    try:
        return TrainDecoderConfig.from_dict(run_config, source=f"the config recorded in {args.model}")
    except ConfigError as error:
        raise SampleInputError(f"{str(error).splitlines()[0]} ... (pass --config_file with the run's config)") from None


def test_split_inputs(args, run_config, device) -> Inputs:
    import torch

    from .data import create_dataloaders
    from .training.batches import BatchPreparer

    config = run_config_for(args, run_config)
    # Every process reads the whole split the same way, so the inputs (and their order) do not depend on ranks.
    loader = create_dataloaders(
        config.data,
        seed=config.seed,
        rank=0,
        world_size=1,
        validation_samples=None,
        test_samples=None,
        image_embed_dim=None if config.decoder.clip else config.decoder.unets[0].image_embed_dim,
    )["test"]
    if len(loader) == 0:
        raise SampleInputError(f"the test split of {config.data.webdataset_base_url} is empty (data.splits.test)")
    prepare = BatchPreparer(config, device=device).prepare
    ids, embeds, texts, masks = [], [], [], []
    loader.set_epoch(0)
    for batch in loader:
        batch = prepare(batch)
        ids += list(batch["key"])
        embeds.append(batch["image_embed"].cpu())
        if "text_encodings" in batch:
            texts.append(batch["text_encodings"].cpu())
            masks.append(
                batch["text_mask"].cpu() if "text_mask" in batch else (batch["text_encodings"].abs().sum(-1) > 0).cpu()
            )
        if args.limit is not None and len(ids) >= args.limit:
            break
    count = len(ids) if args.limit is None else min(len(ids), args.limit)
    text = torch.cat(texts)[:count] if texts else None
    mask = torch.cat(masks)[:count] if masks else None
    return Inputs(ids[:count], torch.cat(embeds)[:count], text, mask, "test_split")


# --- sampling ------------------------------------------------------------------------------------


def _accelerator(args):
    import torch
    from accelerate import Accelerator

    from .runtime import launched

    if launched():
        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        return Accelerator(cpu=cpu)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SampleInputError(f"--device {args.device}: CUDA is not available here")
        torch.cuda.set_device(device.index or 0)
    return Accelerator(cpu=device.type == "cpu")


def sample_items(
    decoder,
    inputs: Inputs,
    items: List[tuple],
    *,
    args,
    samplers,
    steps,
    cond_scale,
    device,
    show,
    on_unet_call=None,
):
    """uint8 images (n, H, W, 3) for `items` = [(input index, seed), ...], sampled as one batch."""
    import torch

    rows = torch.tensor([index for index, _ in items])
    images = decoder.sample(
        image_embed=inputs.image_embed[rows].to(device),
        text_encodings=None if inputs.text_encodings is None else inputs.text_encodings[rows].to(device),
        text_mask=None if inputs.text_mask is None else inputs.text_mask[rows].to(device),
        cond_scale=cond_scale,
        stop_at_unet_number=args.stop_at_unet,
        seed=[seed for _, seed in items],
        sampler=samplers,
        sample_timesteps=steps,
        progress=show,
        on_unet_call=on_unet_call,
    )
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class OutputWriter:
    """Writes the images as their batches come in (each file whole, written beside and renamed), and
    `samples.json` listing them (at most every `SUMMARY_EVERY_S` seconds, and at a stop and at the
    end), so that a stopped or killed command leaves valid files; `grid.png` at the end."""

    SUMMARY_EVERY_S = 10.0
    """Rewriting the whole list after every batch would cost O(images^2) writes on long runs."""

    def __init__(self, out_dir: Path, inputs: Inputs, *, total: int, seeds: List[int], record: Dict[str, Any]):
        self.out_dir = out_dir
        self.inputs = inputs
        self.total = total
        self.seeds = seeds
        self.record = record
        self.entries: List[Dict[str, Any]] = []
        self.images: Dict[tuple, Any] = {}
        self._summary_at = float("-inf")
        (out_dir / "images").mkdir(parents=True, exist_ok=True)

    def add(self, items: List[tuple], images) -> None:
        import functools

        from PIL import Image

        from .common.files import atomic_write

        for (index, seed), pixels in zip(items, images):
            name = f"{index:05d}_{_safe(self.inputs.ids[index])}_seed{seed}.png"
            # format named: the temporary file's suffix is .tmp, which PIL cannot map to PNG
            atomic_write(self.out_dir / "images" / name, functools.partial(Image.fromarray(pixels).save, format="PNG"))
            self.images[(index, seed)] = pixels
            self.entries.append(
                {"file": f"images/{name}", "input": self.inputs.ids[index], "input_index": index, "seed": seed}
            )
        if time.monotonic() - self._summary_at >= self.SUMMARY_EVERY_S:
            self._write_summary()

    def _write_summary(self, **extra: Any) -> None:
        entries = sorted(self.entries, key=lambda entry: (entry["input_index"], self.seeds.index(entry["seed"])))
        summary = {
            "model": self.record["checkpoint"],
            "inputs": self.inputs.kind,
            "count": len(entries),
            "complete": len(entries) == self.total,
            **extra,
            "images": [{**entry, **self.record} for entry in entries],
        }
        atomic_write_text(self.out_dir / "samples.json", json.dumps(summary, indent=2) + "\n")
        self._summary_at = time.monotonic()

    def finish(self, items: List[tuple]) -> None:
        """The grid of every image (one row per input), once all are written."""
        import numpy as np
        import torch
        from PIL import Image
        from torchvision.utils import make_grid

        from .common.files import atomic_write

        stacked = np.stack([self.images[item] for item in items])
        grid = make_grid(torch.from_numpy(stacked).permute(0, 3, 1, 2), nrow=len(self.seeds), padding=2)
        pixels = Image.fromarray(grid.permute(1, 2, 0).numpy())
        atomic_write(self.out_dir / "grid.png", lambda path: pixels.save(path, format="PNG"))
        self._write_summary()

    def stopped(self, signal_name: str) -> None:
        self._write_summary(stopped_by=signal_name)


def _safe(text: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    return cleaned[:60] or "input"


def run(args, stop_request=None) -> int:
    """Sample as `args` say; `stop_request`: the installed `stopping.StopRequest` (checked before each U-Net call)."""
    import torch
    from accelerate.utils import gather_object

    from .common.progress import ProgressOutput
    from .loading import load
    from .stopping import StopRequest, StopRequested, exit_status_after_stop

    stop_request = stop_request or StopRequest()

    accelerator = _accelerator(args)
    device = accelerator.device
    main_process = accelerator.is_main_process
    if args.batch_size < 1:
        raise SampleInputError("--batch_size must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise SampleInputError("--limit must be at least 1")
    if args.text_encodings and not args.embeddings:
        raise SampleInputError("--text_encodings goes with --embeddings")
    seeds = _seeds(args)
    loaded = load(
        args.model,
        use_ema=not args.no_ema,
        device=device,
        endpoint=args.endpoint,
        token=args.token,
        cache_dir=args.cache_dir,
    )
    decoder = loaded.decoder
    count = decoder.num_unets
    stop = args.stop_at_unet or count
    if not 1 <= stop <= count:
        raise SampleInputError(f"--stop_at_unet {stop}: the decoder has U-Nets 1..{count}")
    samplers = _per_unet(args.sampler, count, "--sampler")
    steps = _per_unet(args.steps, count, "--steps")
    cond_scale = _per_unet(args.cond_scale, count, "--cond_scale")
    from .models.samplers import SAMPLER_NAMES

    for name in samplers or []:
        if name not in SAMPLER_NAMES:
            raise SampleInputError(f"--sampler {name}: unknown; choose one of {', '.join(SAMPLER_NAMES)}")
    from .models.cascade_rules import sample_steps_problems

    problems = sample_steps_problems("--steps", steps, count, decoder.num_timesteps, "the decoder's timesteps")
    if problems:
        raise SampleInputError(problems[0])
    chosen = [
        decoder.sampler_for(n, None if samplers is None else samplers[n - 1], None if steps is None else steps[n - 1])
        for n in range(1, stop + 1)
    ]

    if args.embeddings:
        inputs = embeddings_inputs(args, decoder)
        if args.limit is not None:
            inputs = Inputs(
                inputs.ids[: args.limit],
                inputs.image_embed[: args.limit],
                None if inputs.text_encodings is None else inputs.text_encodings[: args.limit],
                None if inputs.text_mask is None else inputs.text_mask[: args.limit],
                inputs.kind,
            )
    elif args.images:
        inputs = image_folder_inputs(args, decoder, loaded.config, device)
    else:
        inputs = test_split_inputs(args, loaded.config, device)

    # Every (input, seed) once, dealt round-robin: ranks get disjoint shares that together cover all.
    # Each share is padded (with repeats, dropped afterwards) to the longest, so that every rank
    # samples batches of the same sizes: their stop checks (before each U-Net call) then line up.
    items = [(index, seed) for index in range(len(inputs.ids)) for seed in seeds]
    mine = items[accelerator.process_index :: accelerator.num_processes]
    share = -(-len(items) // accelerator.num_processes)
    padded = mine + [items[0]] * (share - len(mine))
    if main_process:
        plan = ", ".join(
            f"U-Net {n}: {name} {calls or decoder.num_timesteps} steps" for n, (name, calls) in enumerate(chosen, 1)
        )
        print(
            f"sampling {len(items)} images ({len(inputs.ids)} inputs x {len(seeds)} seeds) on "
            f"{accelerator.num_processes} process(es), {device}; {plan}",
            file=sys.stderr,
            flush=True,
        )
    out_dir = Path(args.out)
    record = {
        "checkpoint": loaded.source,
        "step": loaded.step,
        "weights": loaded.weights,
        "unets": list(range(1, stop + 1)),
        "sampler": [name for name, _ in chosen],
        "steps": [calls or decoder.num_timesteps for _, calls in chosen],
        "cond_scale": cond_scale[:stop],
    }
    writer = OutputWriter(out_dir, inputs, total=len(items), seeds=seeds, record=record) if main_process else None
    check = stop_request.checker(accelerator, "sampling")
    # A bar on a terminal; in a file or pipe, plain lines (at the start, the end and every 30 s).
    output = ProgressOutput(enabled=main_process)
    meter = output.meter("sampling", total=-(-share // args.batch_size), unit="batches", samples_total=len(items))
    try:
        with meter, torch.no_grad():
            for start in range(0, share, args.batch_size):
                images = sample_items(
                    decoder,
                    inputs,
                    padded[start : start + args.batch_size],
                    args=args,
                    samplers=samplers,
                    steps=steps,
                    cond_scale=cond_scale,
                    device=device,
                    show=output,
                    on_unet_call=check,
                )
                real = max(0, min(args.batch_size, len(mine) - start))
                part = (mine[start : start + real], images[:real])
                gathered = gather_object([part]) if accelerator.num_processes > 1 else [part]
                if writer is not None:
                    for part_items, part_images in gathered:
                        writer.add(part_items, part_images)
                meter.update(1, samples=sum(len(part_items) for part_items, _ in gathered))
    except StopRequested as stopped:
        if writer is not None:
            writer.stopped(stopped.signal_name)
            print(
                f"stopped by {stopped.signal_name} during sampling: {len(writer.entries)} of {len(items)} images "
                f"written to {out_dir} (each complete; samples.json lists them), no grid.png",
                file=sys.stderr,
                flush=True,
            )
        status = exit_status_after_stop()
    else:
        if writer is not None:
            writer.finish(items)
            shares = [len(items[rank :: accelerator.num_processes]) for rank in range(accelerator.num_processes)]
            print(
                f"wrote {len(items)} images, grid.png and samples.json to {out_dir} (images per process: {shares})",
                file=sys.stderr,
                flush=True,
            )
        status = EXIT_OK
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        accelerator.end_training()
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command; problems are reported as one line with an exit status by kind (see `failures`)."""
    from .failures import guarded
    from .stopping import StopRequest

    args = build_parser().parse_args(argv)
    speaks = os.environ.get("RANK", "0") == "0"
    # First: a stop signal from now on ends the command in order (within one U-Net call), never mid-file.
    stop_request = StopRequest().install()
    try:
        return guarded(lambda: run(args, stop_request), debug=args.debug, speaks=speaks)
    finally:
        stop_request.uninstall()


if __name__ == "__main__":
    sys.exit(main())
