"""The model card (`README.md`) and `config.json` the huggingface saver commits beside the weights.

`config.json` is what `load_decoder("user/repo")` reads first: the weights file to fetch, what kind
of file it is, the step, and the run configuration (secrets already masked by the tracker).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

HUB_CONFIG = "config.json"
"""The file in a hub repo that says which weights to load (read by `dalle2_decoder.load_decoder`)."""
HUB_FORMAT = "dalle2_decoder.hub/1"
"""`config.json`'s `format`: the version of what this card promises the loader."""


def embedded_config(path: Path) -> Optional[Dict[str, Any]]:
    """The run config recorded in a weights file written by this package (None when it has none)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:  # reads the header only
                text = (handle.metadata() or {}).get("config")
        else:
            import torch

            # mmap: the tensors stay on disk; only the small dict around them is read.
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            text = payload.get("config") if isinstance(payload, dict) else None
        return json.loads(text) if text else None
    except Exception:  # a card without the config is still better than a failed upload
        return None


def _card(repo: str, info: Dict[str, Any]) -> str:
    config = info.get("config") or {}
    decoder = config.get("decoder", {})
    sizes = decoder.get("image_sizes", [])
    lines = [
        "---",
        "library_name: dalle2_decoder",
        "tags:",
        "- dalle2",
        "- unclip",
        "- diffusion",
        "- image-variation",
        "---",
        "",
        f"# {repo.split('/')[-1]}",
        "",
        "A DALL-E 2 (unCLIP) decoder trained with dalle2-decoder: a cascade of "
        f"{len(sizes) or '?'} diffusion U-Net(s) turning CLIP image embeddings into "
        f"{sizes[-1] if sizes else '?'}px images"
        + (f" (stages: {', '.join(f'{s}px' for s in sizes)})." if sizes else "."),
        "",
        f"- weights: `{info['weights']}` ({info['save_type']}; EMA weights are used when the file has them)",
        f"- saved at step {info['step']} (training samples seen)",
        f"- diffusion timesteps: {decoder.get('timesteps', 1000)}; "
        f"samplers: {decoder.get('samplers') or 'reference default'}, "
        f"sample_timesteps: {decoder.get('sample_timesteps')}",
        f"- the run configuration is in `{HUB_CONFIG}` (`config`), with secrets masked",
        "",
        "## Use",
        "",
        "```python",
        "from dalle2_decoder import load_decoder",
        "",
        f'decoder = load_decoder("{repo}")',
        'images = decoder.sample(image_embed=clip_image_embeddings, cond_scale=3.5, sampler="dpmpp_2m_karras", '
        "sample_timesteps=20)",
        "```",
        "",
        "or from the command line:",
        "",
        "```bash",
        f"dalle2-sample-decoder --model {repo} --images my_images/ --out samples/ --sampler dpmpp_2m_karras --steps 20",
        "```",
        "",
    ]
    return "\n".join(lines)


def card_files(save_config, files: List, step: int) -> Dict[str, bytes]:
    """{path in repo: content} of config.json and README.md for a save of `files` (none when no weights go up)."""
    wanted = [save_config.save_latest_to, save_config.save_best_to]
    weights = next((file for dest in wanted if dest for file in files if file.dest == dest), None)
    if weights is None:
        return {}
    info = {
        "library_name": "dalle2_decoder",
        "format": HUB_FORMAT,
        "weights": weights.dest,
        "save_type": save_config.save_type,
        "step": int(step),
        "config": embedded_config(Path(weights.local)),
    }
    return {
        HUB_CONFIG: (json.dumps(info, indent=2) + "\n").encode(),
        "README.md": _card(save_config.huggingface_repo, info).encode(),
    }
