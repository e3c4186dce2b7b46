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
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .common.files import atomic_write_text
from .common.per_unet import per_unet
from .sample_inputs import Inputs, SampleInputError, load_inputs

EXIT_OK = 0


def build_parser() -> argparse.ArgumentParser:
    from .cli import add_debug_option
    from .config.decoder import CLIP_MAKES
    from .models.samplers import SAMPLER_NAMES

    parser = argparse.ArgumentParser(prog="dalle2-sample-decoder", description=__doc__.split("\n\n")[0])
    add = functools.partial(_add_option, parser)
    add(
        "--model",
        required=True,
        metavar="SOURCE",
        help="checkpoint or model save (.pth/.pt/.safetensors), a folder, an http(s) URL, or a hub repo id",
    )
    source = functools.partial(_add_option, parser.add_mutually_exclusive_group(required=True))
    source("--images", metavar="DIR", help="a folder of images: sample variations of each through CLIP")
    source("--embeddings", metavar="FILE.npy", help="a .npy of image embeddings (N, D)")
    source(
        "--test_split",
        action="store_true",
        help="the test split of the run's data (its config from --config_file, else the one in the save)",
    )
    add(
        "--text_encodings",
        metavar="FILE.npy",
        help="with --embeddings: text encodings (N, L, W) or pooled text embeddings (N, W)",
    )
    add(
        "--config_file",
        metavar="PATH",
        help="run config whose data (and decoder.clip) to use instead of the one recorded in the save",
    )
    add("--out", required=True, metavar="DIR", help="output folder")
    add("--seeds", type=int, nargs="+", metavar="S", help="the seeds of each input's samples")
    add("--seed", type=int, default=0, help="first seed when --seeds is not given (default 0)")
    add(
        "--num_per_input",
        type=int,
        default=1,
        metavar="N",
        help="samples per input, seeds --seed .. --seed + N - 1 (default 1)",
    )
    add("--limit", type=int, metavar="N", help="use only the first N inputs")
    each = "one for all U-Nets or one per U-Net"
    add(
        "--cond_scale",
        type=float,
        nargs="+",
        default=[1.0],
        metavar="S",
        help=f"classifier-free guidance scale, {each}",
    )
    add(
        "--sampler",
        nargs="+",
        metavar="NAME",
        help=f"sampler, {each}: {', '.join(SAMPLER_NAMES)} (default: the config's)",
    )
    add(
        "--steps",
        type=int,
        nargs="+",
        metavar="N",
        help=f"sampling steps (network calls), {each} (default: the config's)",
    )
    add("--batch_size", type=int, default=16, metavar="B", help="images sampled at once per process (default 16)")
    add("--stop_at_unet", type=int, metavar="N", help="stop after U-Net N (numbered from 1; default: the last)")
    add("--no_ema", action="store_true", help="use a checkpoint's trained weights instead of its EMA weights")
    add("--device", help="single-process device (default: cuda when available, else cpu)")
    add("--clip_make", help=f"CLIP for --images: {', '.join(CLIP_MAKES)}")
    add("--clip_model", help="CLIP model for --images (default: the config's decoder.clip)")
    add("--clip_pretrained", help="CLIP weights file or pretrained tag for --images")
    add("--endpoint", help="hub endpoint for a hub repo id (default: the hub client's)")
    add("--token", help="hub token (default: the hub client's login or HF_TOKEN)")
    add("--cache_dir", help="download cache folder")
    add_debug_option(parser)
    return parser


def _add_option(parser, name: str, **options) -> None:
    """`name` as written (`--batch_size`, the package's spelling) and with dashes (`--batch-size`)."""
    dashed = name.replace("_", "-")
    parser.add_argument(*dict.fromkeys([name, dashed]), dest=name[2:], **options)


def _checked_seeds(args) -> List[int]:
    """The seeds of each input's samples, once the options that need no model are checked."""
    if args.batch_size < 1:
        raise SampleInputError("--batch_size must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise SampleInputError("--limit must be at least 1")
    if args.text_encodings and not args.embeddings:
        raise SampleInputError("--text_encodings goes with --embeddings")
    if args.seeds:
        if len(set(args.seeds)) != len(args.seeds):
            raise SampleInputError(f"--seeds repeats a seed ({args.seeds}): each would give the same image")
        return list(args.seeds)
    if args.num_per_input < 1:
        raise SampleInputError("--num_per_input must be at least 1")
    return list(range(args.seed, args.seed + args.num_per_input))


def _per_unet(values: Optional[Sequence], count: int, option: str) -> Optional[list]:
    """`common.per_unet.per_unet` for a command-line option, which is always a list (one value: for every
    U-Net); a wrong count is the user's mistake, reported as one (exit status 2), not a ValueError."""
    if values is None:
        return None
    if len(values) not in (1, count):
        raise SampleInputError(
            f"{option} has {len(values)} values but the decoder has {count} U-Nets; give one or one per U-Net"
        )
    return per_unet(values[0] if len(values) == 1 else list(values), count, name=option)


# --- sampling ------------------------------------------------------------------------------------


def _accelerator(args):
    """The launcher's device, else --device. Not `runtime.create_accelerator`: that one is built from a
    training config (train.device, mixed precision, DDP, sharding, CPU thread policy), none of which a
    sampling command has; only the launcher test (`runtime.launched`) is shared."""
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
    from .loading import load
    from .stopping import StopRequest

    accelerator = _accelerator(args)
    device = accelerator.device
    seeds = _checked_seeds(args)
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

    inputs = load_inputs(args, decoder, loaded.config, device)
    items = [(index, seed) for index in range(len(inputs.ids)) for seed in seeds]
    if accelerator.is_main_process:
        plan = ", ".join(
            f"U-Net {n}: {name} {calls or decoder.num_timesteps} steps" for n, (name, calls) in enumerate(chosen, 1)
        )
        print(
            f"sampling {len(items)} images ({len(inputs.ids)} inputs x {len(seeds)} seeds) on "
            f"{accelerator.num_processes} process(es), {device}; {plan}",
            file=sys.stderr,
            flush=True,
        )
    record = {
        "checkpoint": loaded.source,
        "step": loaded.step,
        "weights": loaded.weights,
        "unets": list(range(1, stop + 1)),
        "sampler": [name for name, _ in chosen],
        "steps": [calls or decoder.num_timesteps for _, calls in chosen],
        "cond_scale": cond_scale[:stop],
    }
    writer = None
    if accelerator.is_main_process:
        writer = OutputWriter(Path(args.out), inputs, total=len(items), seeds=seeds, record=record)
    sample = functools.partial(
        sample_items, decoder, inputs, args=args, samplers=samplers, steps=steps, cond_scale=cond_scale, device=device
    )
    status = _sample_all(accelerator, sample, items, writer, args.batch_size, stop_request or StopRequest())
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        accelerator.end_training()
    return status


def _sample_all(accelerator, sample, items: List[tuple], writer: Optional[OutputWriter], batch_size: int, stop_request):
    """Samples this process's share of `items` in batches of `batch_size` (`sample(batch, show=, on_unet_call=)`);
    the main process's `writer` writes every process's images as they come. Returns the exit status."""
    import torch
    from accelerate.utils import gather_object

    from .common.progress import ProgressOutput
    from .stopping import StopRequested, exit_status_after_stop

    # Every (input, seed) once, dealt round-robin: ranks get disjoint shares that together cover all.
    # Each share is padded (with repeats, dropped afterwards) to the longest, so that every rank
    # samples batches of the same sizes: their stop checks (before each U-Net call) then line up.
    mine = items[accelerator.process_index :: accelerator.num_processes]
    share = -(-len(items) // accelerator.num_processes)
    padded = mine + [items[0]] * (share - len(mine))
    check = stop_request.checker(accelerator, "sampling")
    # A bar on a terminal; in a file or pipe, plain lines (at the start, the end and every 30 s).
    output = ProgressOutput(enabled=writer is not None)
    meter = output.meter("sampling", total=-(-share // batch_size), unit="batches", samples_total=len(items))
    try:
        with meter, torch.no_grad():
            for start in range(0, share, batch_size):
                images = sample(padded[start : start + batch_size], show=output, on_unet_call=check)
                real = max(0, min(batch_size, len(mine) - start))
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
                f"written to {writer.out_dir} (each complete; samples.json lists them), no grid.png",
                file=sys.stderr,
                flush=True,
            )
        return exit_status_after_stop()
    if writer is not None:
        writer.finish(items)
        shares = [len(items[rank :: accelerator.num_processes]) for rank in range(accelerator.num_processes)]
        print(
            f"wrote {len(items)} images, grid.png and samples.json to {writer.out_dir} (images per process: {shares})",
            file=sys.stderr,
            flush=True,
        )
    return EXIT_OK


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
