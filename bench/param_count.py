"""Parameter counts of our U-Nets against DALLE2-pytorch 1.15.6 on the same JSON configs.

    python bench/param_count.py [--reference-python /work/refvenv/bin/python] [CONFIG.json ...]

Configs: every example config of this repo (example_configs/*.json), LAION's published
1.5B_laion2B config (tests/fixtures/laion/) and the reference's example decoder configs
(train_decoder_config.example.json and .test.json, looked up in /work/reference_repo/configs or
next to the installed reference). For each U-Net it prints:

- ours: the U-Net our config pipeline builds (`TrainDecoderConfig.from_json_path(...).decoder.create()`),
- unet: our `Unet` built with exactly the constructor arguments the reference's Decoder ended up
  giving that U-Net (after its casting of lowres_cond, channels_out, ...): the U-Net alone,
- ref: the reference's count from `DecoderConfig(**config["decoder"]).create()` (CLIP left out:
  and beta_schedule left out: they do not change the U-Nets), run in a subprocess with the
  reference's interpreter,

and the ratios ours/ref and unet/ref. Exit status 1 unless every ratio is exactly 1.
Models are built on the meta device (shapes only), so even 600M-parameter configs take seconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE_PYTHON = "/work/refvenv/bin/python"
REFERENCE_CONFIG_DIRS = [Path("/work/reference_repo/configs"), REPO / "reference_repo" / "configs"]
REFERENCE_CONFIG_NAMES = ["train_decoder_config.example.json", "train_decoder_config.test.json"]


def default_configs() -> List[Path]:
    configs = sorted((REPO / "example_configs").glob("*.json"))
    configs.append(REPO / "tests" / "fixtures" / "laion" / "1.5B_laion2B" / "decoder_config.json")
    for name in REFERENCE_CONFIG_NAMES:
        found = next((d / name for d in REFERENCE_CONFIG_DIRS if (d / name).exists()), None)
        if found is None:
            print(
                f"note: reference config {name} not found in {[str(d) for d in REFERENCE_CONFIG_DIRS]}", file=sys.stderr
            )
        else:
            configs.append(found)
    return configs


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def reference_side(paths: List[str]) -> Dict[str, Any]:
    """Runs under the reference's interpreter: per config, each U-Net's count and final constructor arguments."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    from dalle2_pytorch.train_configs import DecoderConfig

    out: Dict[str, Any] = {}
    for path in paths:
        raw = json.loads(Path(path).read_text())["decoder"]
        # Left out: they do not shape the U-Nets, and the reference's schema types them
        # differently from ours (a CLIP section it would load; a single beta_schedule string).
        raw.pop("clip", None)
        raw.pop("beta_schedule", None)
        try:
            with torch.device("meta"):
                decoder = DecoderConfig(**raw).create()
        except Exception as err:  # reported per config; the others still run
            out[path] = {"error": f"{type(err).__name__}: {err}"}
            continue
        unets = []
        for unet in decoder.unets:
            # A recast reference U-Net nests its extra kwargs once per cast: flatten them.
            kwargs, extra = dict(unet._locals), {}
            while "kwargs" in kwargs:
                extra.update(kwargs.pop("kwargs"))
                kwargs.update({k: v for k, v in extra.items() if k not in kwargs})
                extra = {}
            unets.append({"count": sum(p.numel() for p in unet.parameters()), "kwargs": _jsonable(kwargs)})
        out[path] = {"unets": unets}
    return out


def reference_counts(reference_python: str, paths: List[str]) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)  # the reference's interpreter must not see this project
    proc = subprocess.run(
        [reference_python, __file__, "--reference-json", *paths], capture_output=True, text=True, env=env, cwd="/"
    )
    if proc.returncode != 0:
        raise SystemExit(f"reference run failed ({reference_python}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def our_counts(path: str, reference_kwargs: List[Dict[str, Any]]) -> Dict[str, Any]:
    import warnings

    import torch

    from dalle2_decoder.config import TrainDecoderConfig
    from dalle2_decoder.models import Unet

    result: Dict[str, Any] = {}
    # Only the U-Nets go to the meta device: the Decoder computes schedule constants on real tensors.
    real_init = Unet.__init__

    @functools.wraps(real_init)  # keeps the signature, which the config checks options against
    def meta_init(self, *args: Any, **kwargs: Any) -> None:
        with torch.device("meta"):
            real_init(self, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Unet.__init__ = meta_init  # type: ignore[method-assign]
        try:
            decoder = TrainDecoderConfig.from_json_path(path).decoder.create()
            result["pipeline"] = [sum(p.numel() for p in u.parameters()) for u in decoder.unets]
        except Exception as err:
            result["pipeline_error"] = f"{type(err).__name__}: {err}"
        finally:
            Unet.__init__ = real_init  # type: ignore[method-assign]
        alone = []
        for kwargs in reference_kwargs:
            with torch.device("meta"):
                alone.append(sum(p.numel() for p in Unet(**kwargs).parameters()))
        result["unet"] = alone
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "configs", nargs="*", type=Path, help="JSON configs (default: the example configs, ours and the reference's)"
    )
    parser.add_argument("--reference-python", default=DEFAULT_REFERENCE_PYTHON)
    parser.add_argument("--reference-json", action="store_true", help=argparse.SUPPRESS)  # subprocess mode
    args = parser.parse_args()
    paths = [str(p.resolve()) for p in (args.configs or default_configs())]
    if args.reference_json:
        print(json.dumps(reference_side(paths)))
        return 0
    if not Path(args.reference_python).exists():
        print(f"reference interpreter {args.reference_python} not found (pass --reference-python)", file=sys.stderr)
        return 2

    sys.path.insert(0, str(REPO))
    reference = reference_counts(args.reference_python, paths)
    ok = True
    print(f"{'config':42s} {'U-Net':>5s} {'ours':>13s} {'unet':>13s} {'ref':>13s} {'ours/ref':>8s} {'unet/ref':>8s}")
    for path in paths:
        label = Path(path).name
        ref = reference[path]
        if "error" in ref:
            print(f"{label:42s} reference rejects it: {ref['error']}")
            continue
        ours = our_counts(path, [u["kwargs"] for u in ref["unets"]])
        if "pipeline_error" in ours:
            ok = False
            print(f"{label:42s} our config pipeline fails: {ours['pipeline_error']}")
        for i, entry in enumerate(ref["unets"]):
            n_ref = entry["count"]
            n_unet = ours["unet"][i]
            n_ours = ours.get("pipeline", [None] * len(ref["unets"]))[i] if len(ours.get("pipeline", [])) > i else None
            ratio_ours = f"{n_ours / n_ref:8.3f}" if n_ours is not None else f"{'-':>8s}"
            ok &= n_ours == n_ref and n_unet == n_ref
            shown = f"{n_ours:13,d}" if n_ours is not None else f"{'-':>13s}"
            flag = "" if (n_ours == n_ref and n_unet == n_ref) else "  DIFFERS"
            print(f"{label:42s} {i + 1:5d} {shown} {n_unet:13,d} {n_ref:13,d} {ratio_ours} {n_unet / n_ref:8.3f}{flag}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
