"""Fixed images and embeddings for the fidelity metric, and the program each rank runs in the
two-process test (`accelerate launch tests/fidelity_fixtures.py OUT CLIP_MODEL COUNT`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Tuple

import torch

IMAGE_SIZE = 16


def fixed_batch(count: int, embed_dim: int, seed: int = 7) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """True images, imperfect reconstructions of them in [0, 1], and the (unnormalised) embeddings
    they were "generated from"."""
    generator = torch.Generator().manual_seed(seed)
    real = torch.rand(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    noise = torch.rand(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    # Worse and worse reconstructions along the batch: the ranks' shares differ, so a value that is not
    # the pooled mean (one rank's, or an average of ranks' means) is far from it.
    noise_weight = torch.linspace(0.1, 0.9, count).view(count, 1, 1, 1)
    generated = ((1 - noise_weight) * real + noise_weight * noise) ** 1.2
    embeddings = torch.randn(count, embed_dim, generator=generator)
    return real, generated, embeddings


def _distributed_main(out_path: str, clip_model: str, count: int) -> None:
    from accelerate import Accelerator

    from dalle2_decoder.clip import create_clip
    from dalle2_decoder.config import ClipConfig
    from dalle2_decoder.evaluation import MetricSuite
    from dalle2_decoder.evaluation.metrics import pooled_count

    state = Accelerator(cpu=True)
    clip = create_clip(ClipConfig(make="open_clip", model=clip_model), device=state.device)
    suite = MetricSuite({}, device=state.device, image_size=IMAGE_SIZE, fidelity=True, clip=clip)
    real, generated, embeddings = fixed_batch(count, clip.image_embed_dim)
    # Uneven shares (rank 0 gets more) in different batch sizes, as in tests/evaluation_fixtures.py.
    split = count // 2 + 3
    mine = slice(0, split) if state.process_index == 0 else slice(split, count)
    batch = 4 if state.process_index == 0 else 3
    real, generated, embeddings = real[mine], generated[mine], embeddings[mine]
    for start in range(0, real.shape[0], batch):
        part = slice(start, start + batch)
        suite.update(real[part], generated[part], embeddings[part])
    values = suite.compute(seed=3)
    values["samples"] = pooled_count(real.shape[0], state)
    values["world_size"] = state.num_processes
    values["distributed"] = torch.distributed.is_initialized()
    if state.is_main_process:
        Path(out_path).write_text(json.dumps(values))
    state.wait_for_everyone()


if __name__ == "__main__":
    _distributed_main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
