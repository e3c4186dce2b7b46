"""Command line: `train_decoder.py --config_file CFG.json [--check] [--set key.path=value ...]`.

The same entry point backs the installed `dalle2-train-decoder` command. `--check` validates the
config and (unless `--no-io`) the world it points at (`dalle2_decoder.preflight`), the same
checks every training run makes first. Exit codes (see `dalle2_decoder.failures`): 0 done (or a
valid config with --check), 1 configuration, 2 usage, 3 data, 4 checkpoint, 5 I/O or environment,
6 stopped (by a stop signal, state saved; or unable to go on), 70 a bug (with its traceback),
130 a second Ctrl-C; every problem is one line on stderr, without a traceback unless --debug is given.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from typing import Any, List, Optional, Sequence, Tuple, Union

from .config import ConfigError, ConfigWarning, TrainDecoderConfig
from .config.checks import closest
from .config.structure import join_path
from .config.tracker import local_save_destinations
from .failures import EXIT_OK, guarded

_KEY = re.compile(r"[^.\[\]]+")
_INDEX = re.compile(r"\[(\d+)\]")


def parse_override(text: str) -> Tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 0.0003): the value is JSON, or else taken as a string."""
    path, separator, value = text.partition("=")
    if not separator or not path.strip():
        raise argparse.ArgumentTypeError(f"expected KEY.PATH=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return path.strip(), parsed


def _tokens(path: str) -> List[Union[str, int]]:
    """`decoder.unets[0].dim` -> ["decoder", "unets", 0, "dim"]; raises ValueError when malformed."""
    tokens: List[Union[str, int]] = []
    position = 0
    while position < len(path):
        if path[position] == "[" and tokens:
            match = _INDEX.match(path, position)
        elif path[position] == "." and tokens:
            match = _KEY.match(path, position + 1)
        elif position == 0:
            match = _KEY.match(path, position)
        else:
            match = None
        if match is None:
            raise ValueError("not a path like decoder.unets[0].dim")
        tokens.append(int(match.group(1)) if match.re is _INDEX else match.group(0))
        position = match.end()
    return tokens


def apply_override(raw: Any, path: str, value: Any) -> List[str]:
    """Set `value` at `path` in the raw config (in place). Returns problems (empty on success).

    Missing objects on the way are created, so `--set evaluate.FID.feature=64` works on a config
    without `evaluate`; an unknown key is then reported by the normal checks with a suggestion.
    A path through something that is not an object, or a list index out of range, is a problem.
    """
    where = f"--set {path}"
    try:
        tokens = _tokens(path)
    except ValueError as error:
        return [f"{where}: {error}"]
    container = raw
    walked = ""
    for position, token in enumerate(tokens):
        last = position == len(tokens) - 1
        if isinstance(token, int):
            if not isinstance(container, list):
                return [f"{where}: {walked or 'the config'} is not a list"]
            if token >= len(container):
                return [f"{where}: {walked} has {len(container)} entries, no index {token}"]
        else:
            if not isinstance(container, dict):
                return [f"{where}: {walked or 'the config'} is not an object"]
            if token not in container and not last:
                if isinstance(tokens[position + 1], int):
                    match = closest(token, [key for key in container if isinstance(key, str)])
                    hint = f" (did you mean {match}?)" if match else ""
                    return [f"{where}: {join_path(walked, token)} does not exist{hint}"]
                container[token] = {}
        if last:
            container[token] = value
        else:
            container = container[token]
            walked = join_path(walked, token)
    return []


def build_parser() -> argparse.ArgumentParser:
    from .config.choices import choices_epilog

    parser = argparse.ArgumentParser(
        prog=os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "train_decoder.py",
        description="Train a DALL-E 2 decoder from one JSON config (run it under `accelerate launch` for "
        "several GPUs or nodes).",
        epilog=choices_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the epilog's table keeps its lines
    )
    parser.add_argument(
        "--config_file",
        "--config-file",
        dest="config_file",
        required=True,
        metavar="PATH",
        help="the JSON configuration of the run",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate only: print the resolved configuration (every default filled in) as JSON "
        "and exit 0, or print every problem and exit with its kind (2 config, 3 data, "
        "4 checkpoint, 5 I/O)",
    )
    parser.add_argument(
        "--no-io",
        "--no_io",
        dest="no_io",
        action="store_true",
        help="with --check: check the configuration alone, not the device, data, paths and checkpoint it points at",
    )
    add_override_option(
        parser,
        "override one option before validation, e.g. --set train.lr=3e-4 or "
        "--set decoder.unets[0].dim=64 (VALUE is JSON, else a string); repeatable",
    )
    add_debug_option(parser)
    return parser


def add_override_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """`--set KEY.PATH=VALUE` (repeatable): the commands that read a run config take overrides alike."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        type=parse_override,
        metavar="KEY.PATH=VALUE",
        help=help_text,
    )


def add_debug_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the full traceback of errors too (they are one line each without it)",
    )


def _is_main_process() -> bool:
    """Under `accelerate launch` / torchrun every rank runs this; only rank 0 prints notes and problems."""
    return os.environ.get("RANK", "0") == "0"


def load_config(config_file: str, overrides: Sequence[Tuple[str, Any]] = ()) -> Tuple[TrainDecoderConfig, List[str]]:
    """The checked config with `overrides` applied, and its notes; raises `ConfigError`."""
    raw = TrainDecoderConfig.read_json(config_file)
    problems: List[str] = []
    for path, value in overrides:
        problems += apply_override(raw, path, value)
    if problems:
        raise ConfigError(problems, source=config_file)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        config = TrainDecoderConfig.from_dict(raw, source=config_file)
    notes = [str(warning.message) for warning in caught if issubclass(warning.category, ConfigWarning)]
    return config, notes


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    speaks = _is_main_process()
    state = {}
    return guarded(
        lambda: _main(args, speaks, state),
        debug=args.debug,
        speaks=speaks,
        write_paths=lambda: _write_paths(state.get("config")),
    )


def _print_memory_plan(config: TrainDecoderConfig) -> None:
    """`--check`'s memory plan, on stderr (stdout is the resolved config): per U-Net and process, under
    DDP and FSDP for this launch's process count, with a warning where it does not fit."""
    from .training.memory_plan import device_memory, memory_plan_lines

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    precision = config.train.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    replicas, checkpointing = 1, False
    try:
        from .runtime import sharding_from_launcher

        sharding = sharding_from_launcher(processes)
        if sharding is not None:
            replicas, checkpointing = sharding.replicate, sharding.activation_checkpointing
    except Exception:  # the run itself reports a bad launch configuration; the plan assumes FULL_SHARD
        pass
    try:
        lines = memory_plan_lines(
            config,
            processes=processes,
            replicas=replicas,
            precision=precision,
            available=device_memory(),
            activation_checkpointing=checkpointing,
        )
    except Exception as error:  # a plan that cannot be made must not fail the check
        lines = [f"memory plan: not computed ({type(error).__name__}: {error})"]
    for line in lines:
        print(line, file=sys.stderr)


def _main(args: argparse.Namespace, speaks: bool, state: dict) -> int:
    config, notes = load_config(args.config_file, args.overrides)
    state["config"] = config
    if speaks:
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
    if args.check:
        if not args.no_io:
            from .preflight import ensure_ready

            ensure_ready(config, source=args.config_file, purpose="training")
            if speaks:
                _print_memory_plan(config)
        print(config.to_json())
        return EXIT_OK
    # imported here, not at the top: `--check` answers without loading the training stack
    from .preflight import ensure_ready
    from .stopping import StopRequest

    # From here on a stop signal is honoured, never fatal: one during the checks or the set-up ends
    # the run at its first check, before training anything.
    stop = StopRequest().install()
    try:
        ensure_ready(config, source=args.config_file, purpose="training")
        result = train(config, stop=stop)
    finally:
        stop.uninstall()
    return result if isinstance(result, int) else EXIT_OK


def train(config: TrainDecoderConfig, stop=None) -> int:
    """Run the training loop on a checked config (its exit status); `stop`: an installed `StopRequest`."""
    from .training import main as run_training

    return run_training(config, stop=stop)


def _write_paths(config: Optional[TrainDecoderConfig]) -> List[str]:
    """Where a run writes (for the report of a failed write): the data path and local save folders."""
    if config is None:
        return []
    data_path = os.path.abspath(os.path.expanduser(config.tracker.data_path))
    saves = local_save_destinations(config.tracker, data_path, ("save_latest_to", "save_best_to"))
    return list(dict.fromkeys([data_path] + [str(path.parent) for _, _, path in saves]))


if __name__ == "__main__":
    sys.exit(main())
