"""`dalle2-convert-checkpoint IN OUT.safetensors`: a DALLE2-pytorch checkpoint or model file as our model save.

The input is a DALLE2-pytorch trainer checkpoint (`DecoderTrainer.save`, the tracker's
`checkpoint`), a model file (`model.pth`, as the community's released decoders), or a file of
this package. It is read weights-only (only the `packaging` version object these files hold is
allowed besides tensors and plain containers), names are mapped, and the weights are checked
against the decoder the config describes before anything is written. The output is a
safetensors model save (EMA weights by default) that `load_model_weights`, `tracker.load` and
`dalle2-evaluate-decoder` take, with the config in its metadata.

The config is the one given with `--config_file`, else the one the input file records
(DALLE2-pytorch files record the run's config; its unset options are left to our defaults; files
of earlier releases build that release's U-Nets, see models/releases.py).

A cascade from parts (dalle2-laion's `unet_sources`): `--unet 1=base.pth --unet 2=upsampler.pth
--config cascade.json --out cascade.safetensors` takes each U-Net from its own file (`2=FILE:N`:
U-Net N of that file), each checked against its slot of the cascade config (tracking/parts.py).

Exit status: 0 written, 1 a problem with the config, 4 with a file (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional, Sequence

EXIT_OK = 0


def _config(loaded, config_file: Optional[str]):
    from .config import ConfigError, ConfigWarning, TrainDecoderConfig

    if config_file is not None:
        from .cli import load_config

        return load_config(config_file)[0], config_file
    if loaded.config_json is None:
        raise ConfigError(
            [f"{loaded.source} records no config; give the run's config with --config_file"],
            source="dalle2-convert-checkpoint",
        )
    from .tracking.reference import recorded_config

    raw = recorded_config(loaded)  # a DALLE2-pytorch file's: its release's U-Nets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)  # options of the reference's trainer we do not use
        return TrainDecoderConfig.from_dict(raw, source=f"the config recorded in {loaded.source}"), "the input file"


def convert(source: str, output: str, *, config_file: Optional[str] = None, use_ema: bool = True) -> str:
    """Write `output` (safetensors) from `source`; returns a one-line summary. Raises CheckpointError / ConfigError."""
    from .tracking import CheckpointError, load_state_dict_checked, read_file, save_model
    from .tracking.checkpoint import check_release
    from .training.state import checkpoint_weights

    if not output.endswith(".safetensors"):
        raise CheckpointError(f"{output}: the output must be a .safetensors file")
    loaded = read_file(source)
    config, config_from = _config(loaded, config_file)
    decoder = config.decoder.create()
    if loaded.kind == "model":
        weights, which = loaded.model_state, "the model file's weights"
    else:
        weights = checkpoint_weights(loaded, use_ema=use_ema)
        has_ema = bool(loaded.state["trainer"].get("emas"))
        which = "EMA weights" if use_ema and has_ema else "trained weights (no EMA)" if use_ema else "trained weights"
    absent = [n for n in range(1, len(decoder.unets) + 1) if not any(k.startswith(f"unets.{n - 1}.") for k in weights)]
    if absent and len(absent) < len(decoder.unets):
        raise CheckpointError(
            f"{source} has no weights for U-Net(s) {', '.join(map(str, absent))} (the run that wrote it froze them); "
            "a model save needs every U-Net: fine-tune from it with tracker.load instead"
        )
    check_release(decoder, loaded)  # a config given for a file of an earlier release builds its U-Nets
    load_state_dict_checked(decoder, weights, source=source)  # every U-Net present, every name and shape right
    save_model(output, decoder.state_dict(), step=loaded.step, config_json=config.to_json(indent=None))
    notes = "".join(f"; {note}" for note in loaded.notes)
    return (
        f"wrote {output}: {len(config.decoder.unets)} U-Net(s), {which}, step {loaded.step}, "
        f"config from {config_from}{notes}"
    )


def assemble_parts(parts: Sequence[str], output: str, *, config_file: str, use_ema: bool = True) -> str:
    """Write `output` (safetensors) from U-Nets of several files (`SLOT=FILE[:N]` each) into the cascade of
    `config_file`; returns a one-line summary. Raises CheckpointError / ConfigError."""
    from .cli import load_config
    from .tracking import CheckpointError, load_state_dict_checked, read_file, save_model
    from .tracking.parts import UnetPart, assemble, parse_part

    if not output.endswith(".safetensors"):
        raise CheckpointError(f"{output}: the output must be a .safetensors file")
    config = load_config(config_file)[0]
    chosen = []
    for text in parts:
        try:
            slot, path, file_unet = parse_part(text)
        except ValueError as error:
            raise CheckpointError(str(error)) from error
        chosen.append(UnetPart(slot, read_file(path), file_unet))
    config, state = assemble(config, chosen, use_ema=use_ema)
    decoder = config.decoder.create()
    load_state_dict_checked(decoder, state, source="the assembled U-Nets")
    save_model(output, decoder.state_dict(), step=0, config_json=config.to_json(indent=None))
    sources = ", ".join(f"U-Net {p.slot} from {p.loaded.source}" for p in sorted(chosen, key=lambda p: p.slot))
    return f"wrote {output}: {len(chosen)} U-Net(s) assembled ({sources}), config from {config_file}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalle2-convert-checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "input", nargs="?", help="DALLE2-pytorch checkpoint or model file (.pth), or a file of this package"
    )
    parser.add_argument("output", nargs="?", help="the model save to write (.safetensors)")
    parser.add_argument("--out", dest="out", default=None, metavar="PATH", help="the model save to write (as OUTPUT)")
    parser.add_argument(
        "--unet",
        action="append",
        default=[],
        metavar="SLOT=FILE[:N]",
        help="assemble a cascade: U-Net SLOT of --config from FILE (its U-Net N; default SLOT, or its only one); "
        "once per U-Net",
    )
    parser.add_argument(
        "--config_file",
        "--config-file",
        "--config",
        dest="config_file",
        default=None,
        metavar="PATH",
        help="the run's JSON config (default: the config recorded in the input)",
    )
    parser.add_argument(
        "--no_ema",
        "--no-ema",
        dest="no_ema",
        action="store_true",
        help="from a checkpoint, write the trained weights instead of the EMA weights",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the full traceback of errors too (they are one line each without it)",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .failures import guarded

    parser = build_parser()
    args = parser.parse_args(argv)
    output = args.out or (args.input if args.unet and args.output is None else args.output)
    if args.unet:
        if args.input is not None and output != args.input:
            parser.error("with --unet, give no input file: each U-Net comes from its --unet file")
        if args.config_file is None:
            parser.error("--unet needs --config: the cascade's config (its U-Nets, sizes and diffusion)")
    elif args.input is None:
        parser.error("give the input file, or --unet SLOT=FILE for each U-Net of a cascade")
    if output is None:
        parser.error("give the output file (OUTPUT or --out)")

    def body() -> int:
        if args.unet:
            summary = assemble_parts(args.unet, output, config_file=args.config_file, use_ema=not args.no_ema)
        else:
            summary = convert(args.input, output, config_file=args.config_file, use_ema=not args.no_ema)
        print(summary, flush=True)
        return EXIT_OK

    # One line per problem and an exit status by kind, as every command (see `failures`).
    return guarded(body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
