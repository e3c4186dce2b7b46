"""Parameter counts of our U-Nets against the reference implementation on the same configs.

    python bench/param_count.py [--reference-python .venv-ref/bin/python]

The configs are those of DALLE2-pytorch's example decoder configs (plus one exercising text
conditioning and memory_efficient). The reference (dalle2_pytorch, kept out of this project's
environment) is run in a subprocess with the other interpreter when it is not importable here.
Exit status 1 when a ratio falls outside [0.75, 1.25].
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 0.25

# name -> (unet kwargs list, decoder kwargs); option names are shared by both implementations.
CONFIGS: Dict[str, tuple] = {
    "example 64px (train_decoder_config.example.json)": (
        [dict(dim=128, image_embed_dim=768, cond_dim=64, channels=3, dim_mults=[1, 2, 4, 8], attn_dim_head=32, attn_heads=16)],
        dict(image_sizes=[64], timesteps=1000, learned_variance=True),
    ),
    "dim 320, mults [1,2,3,4], cond_dim 512": (
        [dict(dim=320, image_embed_dim=768, cond_dim=512, channels=3, dim_mults=[1, 2, 3, 4], attn_dim_head=32, attn_heads=16)],
        dict(image_sizes=[64], timesteps=1000, learned_variance=True),
    ),
    "2-U-Net upsampler (train_upsampler_config.test.json)": (
        [
            dict(dim=16, image_embed_dim=768, cond_dim=16, channels=3, dim_mults=[1, 2, 4, 8], attn_dim_head=16, attn_heads=4,
                 self_attn=[False, True, True, True])
            for _ in range(2)
        ],
        dict(image_sizes=[64, 256], timesteps=10, learned_variance=True),
    ),
    "text-conditioned, memory_efficient upsampler": (
        [
            dict(dim=64, image_embed_dim=768, text_embed_dim=768, cond_dim=128, cond_on_text_encodings=True, dim_mults=[1, 2, 4],
                 self_attn=[False, True, True], num_resnet_blocks=2, attn_heads=8, attn_dim_head=32),
            dict(dim=32, image_embed_dim=768, cond_dim=128, dim_mults=[1, 2, 4, 8], memory_efficient=True,
                 num_resnet_blocks=[1, 2, 2, 3], init_cross_embed=False),
        ],
        dict(image_sizes=[64, 256], timesteps=1000, learned_variance=[True, False]),
    ),
}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_ours() -> Dict[str, List[int]]:
    import torch

    from dalle2_decoder.models import Decoder, Unet

    counts = {}
    for name, (unet_kwargs, decoder_kwargs) in CONFIGS.items():
        with torch.device("meta"):  # shapes only: no memory, no init time
            decoder = Decoder([Unet(**kw) for kw in unet_kwargs], **decoder_kwargs)
        counts[name] = [_count(u) for u in decoder.unets]
    return counts


def count_reference() -> Dict[str, List[int]]:
    import torch
    from dalle2_pytorch import Decoder, Unet

    counts = {}
    for name, (unet_kwargs, decoder_kwargs) in CONFIGS.items():
        with torch.device("meta"):
            decoder = Decoder(unet=[Unet(**kw) for kw in unet_kwargs], **decoder_kwargs)
        counts[name] = [_count(u) for u in decoder.unets]
    return counts


def reference_counts(reference_python: str) -> Dict[str, List[int]] | None:
    """Reference counts in-process if dalle2_pytorch imports here, else via the other interpreter."""
    try:
        import dalle2_pytorch  # noqa: F401

        return count_reference()
    except ImportError:
        pass
    if not Path(reference_python).exists():
        return None
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([reference_python, __file__, "--reference-json"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"reference run failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-python", default=str(REPO / ".venv-ref" / "bin" / "python"))
    parser.add_argument("--reference-json", action="store_true", help=argparse.SUPPRESS)  # subprocess mode
    args = parser.parse_args()
    if args.reference_json:
        print(json.dumps(count_reference()))
        return 0

    sys.path.insert(0, str(REPO))
    ours = count_ours()
    reference = reference_counts(args.reference_python)
    if reference is None:
        print("reference (dalle2_pytorch) not available: printing our counts only")
    ok = True
    print(f"{'config':55s} {'U-Net':>5s} {'ours':>13s} {'reference':>13s} {'ratio':>7s}")
    for name, counts in ours.items():
        for i, n in enumerate(counts):
            if reference is None:
                print(f"{name:55s} {i + 1:5d} {n:13,d}")
                continue
            ref = reference[name][i]
            ratio = n / ref
            within = abs(ratio - 1) <= TOLERANCE
            ok &= within
            print(f"{name:55s} {i + 1:5d} {n:13,d} {ref:13,d} {ratio:7.3f}{'' if within else '  OUT OF RANGE'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
