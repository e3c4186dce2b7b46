"""LAION's published decoder, shrunk: its U-Net options under the release that trained it, and its samples.

    PYTHONPATH=<folder with one DALLE2-pytorch release> python scripts/reference_fixtures/generate.py --only laion

(`releases.py` makes such folders; 0.15.4 for LAION's 1.5B and 1B decoders, 1.0.3 for v1.0.2, whose
release 1.0.2 is not on PyPI and has 1.0.1's and 1.0.3's model code). Writes
`tests/fixtures/reference/laion/<version>/`:

- `config.json`: the `decoder` section of tests/fixtures/laion/1.5B_laion2B/decoder_config.json with
  its sizes shrunk (`SHRUNK`: widths, one ResNet block, two of its four levels, the first without
  self-attention and the second with it, as its first two are; 16px, 16 timesteps, no CLIP: the
  embeddings are given): every other option that shapes the network (sparse and memory-efficient
  attention, text conditioning, learned variance, the cosine schedule) is as published;
- `model.pth`: that release's Decoder state dict (a bare one, as 0.15.4's model saves are), its
  weights moved off their initial values so that every one of them shows in the samples;
- `samples.safetensors`: `Decoder.sample` with image embeddings, text encodings and a guidance
  scale of 1.7 (dalle2-laion's default for these decoders), with every Gaussian tensor drawn, in order;
- `meta.json`: the release and torch versions.

Needs no import of dalle2_decoder.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Dict, List

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from checkpoint_cases import recorded_noise  # noqa: E402

PUBLISHED = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "laion" / "1.5B_laion2B"
SHRUNK = {
    "dim": 8,
    "cond_dim": 16,
    "image_embed_dim": 8,
    "text_embed_dim": 8,
    "attn_heads": 2,
    "attn_dim_head": 8,
    "num_resnet_blocks": 1,
    # Two levels of the four: one without self-attention (sparse attention there), one with.
    "dim_mults": [1, 2],
    "self_attn": [False, True],
}
SIZE = 16
TIMESTEPS = 16
BATCH = 2
TEXT_LENGTH = 4
COND_SCALE = 1.7


def shrunk_config() -> Dict:
    decoder = json.loads((PUBLISHED / "decoder_config.json").read_text())["decoder"]
    decoder.pop("clip")
    for unet in decoder["unets"]:
        unet.update(SHRUNK)
    decoder.update(image_sizes=[SIZE], timesteps=TIMESTEPS)
    return {"decoder": decoder}


def generate(out_dir: pathlib.Path) -> pathlib.Path:
    from dalle2_pytorch.train_configs import DecoderConfig
    from dalle2_pytorch.version import __version__
    from safetensors.torch import save_file

    target = out_dir / __version__
    target.mkdir(parents=True, exist_ok=True)
    config = shrunk_config()
    torch.manual_seed(0)
    decoder = DecoderConfig(**json.loads(json.dumps(config["decoder"]))).create()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    decoder.eval()
    torch.save(decoder.state_dict(), target / "model.pth")
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    image_embed = torch.randn(BATCH, SHRUNK["image_embed_dim"], generator=generator)
    text_encodings = torch.randn(BATCH, TEXT_LENGTH, SHRUNK["text_embed_dim"], generator=generator)
    noise: List[torch.Tensor] = []
    with torch.no_grad(), recorded_noise(3, noise):
        images = decoder.sample(image_embed=image_embed, text_encodings=text_encodings, cond_scale=COND_SCALE)
    tensors = {"image_embed": image_embed, "text_encodings": text_encodings, "images": images.contiguous()}
    tensors.update({f"noise.{index}": value.contiguous() for index, value in enumerate(noise)})
    save_file(tensors, str(target / "samples.safetensors"))
    meta = {
        "dalle2_pytorch": __version__,
        "torch": torch.__version__,
        "cond_scale": COND_SCALE,
        "num_noise": len(noise),
    }
    (target / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return target
