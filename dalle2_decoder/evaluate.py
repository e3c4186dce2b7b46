"""Evaluate a saved checkpoint without training.

    python -m dalle2_decoder.evaluation --config_file CFG.json --checkpoint latest.pth [--n_samples N]
    accelerate launch -m dalle2_decoder.evaluation --config_file CFG.json --checkpoint model.safetensors
    dalle2-evaluate-decoder --config_file CFG.json --checkpoint latest.pth

The config's `evaluate` section says which metrics (the fidelity metrics unless
`evaluate.fidelity.enabled` is false; --clip_* name the CLIP for CLIP similarity); `data` gives the
validation split; the checkpoint is a trainer checkpoint (EMA weights are used when `train.use_ema`,
unless --no_ema) or a model save. The metrics are printed as one JSON object on stdout (main
process), and appended as a JSON line to --output when given. Exit codes are those of the training
command (`dalle2_decoder.failures`): 0 done, 1 configuration (e.g. no metric enabled, missing metric
weights), 2 usage, 3 data, 4 checkpoint, 5 I/O or environment, 6 stopped by a signal (within one
U-Net call, no metrics written), 70 a bug; each problem is one line on stderr, with a traceback only
under --debug (and for a bug).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

import attrs
from torch import nn

from .common.per_unet import per_unet
from .failures import EXIT_CONFIG, EXIT_OK, PreflightError, Problem, UsageError, guarded


def build_parser() -> argparse.ArgumentParser:
    from .config.choices import choices_epilog

    parser = argparse.ArgumentParser(
        prog="python -m dalle2_decoder.evaluation",
        description=__doc__.split("\n\n")[0],
        epilog=choices_epilog(),  # for --set
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config_file",
        "--config-file",
        dest="config_file",
        required=True,
        metavar="PATH",
        help="the run's JSON configuration (its evaluate, data and decoder sections are used)",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="a checkpoint (.pth) or model save (.safetensors / .pth) written by training",
    )
    parser.add_argument(
        "--n_samples",
        "--n-samples",
        dest="n_samples",
        type=int,
        default=None,
        metavar="N",
        help="images to generate (default: evaluate.n_evaluation_samples)",
    )
    parser.add_argument(
        "--no_ema",
        "--no-ema",
        dest="no_ema",
        action="store_true",
        help="evaluate a checkpoint's trained weights instead of its EMA weights",
    )
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: the config's seed)")
    parser.add_argument(
        "--output", metavar="PATH", default=None, help="append the metrics as one JSON line to this file"
    )
    for option, field, meaning in (
        ("--clip_make", "make", "openai or open_clip"),
        ("--clip_model", "model", "e.g. ViT-L/14, or an open_clip `local-dir:` folder"),
        ("--clip_pretrained", "pretrained", "a local weights file"),
    ):
        parser.add_argument(
            option,
            option.replace("_", "-"),
            dest=option[2:],
            metavar="VALUE",
            default=None,
            help=f"the CLIP for CLIP similarity: {meaning} (short for --set evaluate.fidelity.clip.{field}=VALUE)",
        )
    from .cli import add_debug_option, add_override_option

    add_override_option(parser, "override one config option, as for train_decoder.py")
    add_debug_option(parser)
    return parser


def load_decoder(config, checkpoint: str, *, use_ema: bool) -> Tuple[nn.Module, int]:
    """`config.decoder.create()` with the checkpoint's weights (see `training.state`), and the step it was saved at."""
    from .tracking import CheckpointError, load_state_dict_checked, read_file
    from .tracking.checkpoint import check_release
    from .training.state import checkpoint_weights

    try:
        loaded = read_file(checkpoint)
    except (KeyError, TypeError, ValueError) as error:  # a file with a format tag but not the entries it promises
        raise CheckpointError(
            f"{checkpoint}: not a complete checkpoint or model save (missing or malformed entry {error})"
        ) from error
    decoder = config.decoder.create()
    check_release(decoder, loaded)  # a file of an earlier DALLE2-pytorch release needs its release's U-Nets
    if loaded.kind == "model":
        if not isinstance(loaded.model_state, dict):
            raise CheckpointError(f"{checkpoint}: a model save without its 'model' weights")
        load_state_dict_checked(decoder, loaded.model_state, source=loaded.source)
    else:
        load_state_dict_checked(decoder, checkpoint_weights(loaded, use_ema=use_ema), source=loaded.source)
    return decoder, loaded.step


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .stopping import StopRequest

    args = build_parser().parse_args(argv)
    speaks = os.environ.get("RANK", "0") == "0"
    # First: a stop signal from now on ends the evaluation in order (within one U-Net call).
    stop = StopRequest().install()
    try:
        return guarded(
            lambda: _main(args, speaks, stop),
            debug=args.debug,
            speaks=speaks,
            write_paths=lambda: [os.path.dirname(os.path.abspath(args.output))] if args.output else [],
        )
    finally:
        stop.uninstall()


def _main(args: argparse.Namespace, speaks: bool, stop=None) -> int:
    from .cli import load_config
    from .preflight import checkpoint_file_problems, ensure_ready, writable_problem

    if args.n_samples is not None and args.n_samples < 1:
        raise UsageError(f"--n_samples must be at least 1 (got {args.n_samples})")
    # The checkpoint and output are the command's own arguments: checked before the config is read.
    problems = checkpoint_file_problems(args.checkpoint, "--checkpoint")
    if args.output:
        problem = writable_problem(os.path.dirname(os.path.abspath(args.output)), "--output")
        problems += [problem] if problem else []
    if problems:
        raise PreflightError(problems)
    clip_options = [("make", args.clip_make), ("model", args.clip_model), ("pretrained", args.clip_pretrained)]
    overrides = list(args.overrides) + [
        (f"evaluate.fidelity.clip.{field}", value) for field, value in clip_options if value is not None
    ]
    config, notes = load_config(args.config_file, overrides)
    if args.n_samples is not None:
        config = attrs.evolve(config, evaluate=attrs.evolve(config.evaluate, n_evaluation_samples=args.n_samples))
    if not config.evaluate.in_command():
        raise PreflightError(
            [
                Problem(
                    EXIT_CONFIG,
                    f"{args.config_file}: enables no metric: give evaluate.FID, IS, KID or LPIPS an object, "
                    "or leave evaluate.fidelity.enabled unset",
                )
            ]
        )
    if speaks:
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
    ensure_ready(config, source=args.config_file, purpose="evaluation")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .stopping import StopRequested, exit_status_after_stop

    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON result alone
            metrics, step = evaluate_checkpoint(
                config,
                args.checkpoint,
                use_ema=config.train.use_ema and not args.no_ema,
                seed=config.seed if args.seed is None else args.seed,
                stop=stop,
            )
    except StopRequested as stopped:
        if speaks:
            print(f"{stopped}: {stopped.progress or 'no image generated yet'}; no metrics written", file=sys.stderr)
        return exit_status_after_stop()
    if metrics is not None:
        from .tracking.loggers import json_safe

        result = json_safe({"checkpoint": args.checkpoint, "step": step, **metrics})
        print(json.dumps(result), flush=True)
        if args.output:
            with Path(args.output).open("a") as handle:
                handle.write(json.dumps(result) + "\n")
    return EXIT_OK


def evaluate_checkpoint(config, checkpoint: str, *, use_ema: bool, seed: int, stop=None):
    """(metrics, step) on the main process, (None, step) on the others; every rank must call it.

    `stop`: the installed `stopping.StopRequest`; on a stop signal every rank raises `StopRequested`
    (after shutting the process group down) within one U-Net call.
    """
    from .common.progress import ProgressOutput
    from .evaluation import EvaluationSetupError, Evaluator, evaluation_loader, fidelity_clip, final_image_size
    from .runtime import create_accelerator, shut_down
    from .stopping import StopRequested
    from .training.batches import BatchPreparer
    from .training.trainer import used_unets

    accelerator = create_accelerator(config, purpose="evaluation")
    unets = used_unets(config)
    if not unets:
        raise EvaluationSetupError("train.unet_training_mask leaves no U-Net to sample with")
    decoder, step = load_decoder(config, checkpoint, use_ema=use_ema)
    decoder.to(accelerator.device).eval()
    main_process = accelerator.is_main_process
    preparer = BatchPreparer(config, device=accelerator.device)
    evaluator = Evaluator(
        config.evaluate,
        accelerator,
        evaluation_loader(config, accelerator),
        unets=unets,
        image_size=final_image_size(config, unets),
        prepare=preparer.prepare,
        cond_scale=per_unet(config.train.cond_scale, len(config.decoder.unets)),
        seed=seed,
        info=(lambda message: print(message, file=sys.stderr, flush=True)) if main_process else (lambda message: None),
        stop=stop,
        progress=ProgressOutput(interval_s=config.tracker.progress_interval_s, enabled=main_process),
        clip=fidelity_clip(config, accelerator.device, run_clip=preparer.clip_embedder),
    )
    try:
        metrics = evaluator(decoder)
    except StopRequested:
        shut_down(accelerator)  # every rank stopped at the same point, so they can meet
        raise
    shut_down(accelerator)
    return (metrics if main_process else None), step
