"""The one-screen summary a training run prints at start: processes, data, epochs, and each U-Net."""

from __future__ import annotations

import json
from typing import List, Mapping

from accelerate import Accelerator
from torch import nn

from ..config.recipes import DEFAULT_RECIPE, recipe_options
from ..config.root import TrainDecoderConfig
from .trainer import DecoderTrainer


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summary_lines(
    config: TrainDecoderConfig, accelerator: Accelerator, trainer: DecoderTrainer, loaders: Mapping
) -> List[str]:
    """The summary's lines, U-Nets numbered from 1."""
    data = config.data
    train_batches = len(loaders["train"])
    per_rank = train_batches * data.batch_size
    embeddings = data.img_embeddings_url or ("CLIP on the fly" if config.decoder.clip else "inside the shards")
    lines = [
        "dalle2-decoder training",
        f"  processes      {accelerator.num_processes} ({accelerator.distributed_type.value}), "
        f"device {accelerator.device}",
        f"  precision      {accelerator.mixed_precision}",
        f"  data           {data.webdataset_base_url} shards {data.start_shard}..{data.end_shard}",
        f"  embeddings     {embeddings}",
        f"  samples/epoch  {per_rank * accelerator.num_processes} "
        f"({train_batches} batches of {data.batch_size} per rank)",
        f"  epochs         {config.train.epochs}",
    ]
    if config.recipe != DEFAULT_RECIPE:
        # Which options came from the recipe and not from the config file (`--check` prints them all).
        filled = ", ".join(
            f"{path}={json.dumps(value)}" for path, value in recipe_options(config.recipe, config.to_dict()).items()
        )
        lines.append(f"  recipe         {config.recipe}: {filled} unless the config sets them")
    for number in range(1, len(trainer.decoder.unets) + 1):
        state = "trained" if number in trainer.trained_unets else "frozen"
        size = config.decoder.image_sizes[number - 1]
        sampler, steps = trainer.decoder.sampler_for(number)  # what sample grids and evaluation use
        lines.append(
            f"  U-Net {number}        {count_parameters(trainer.decoder.get_unet(number)) / 1e6:.2f}M parameters, "
            f"{size}px, {state}, samples with {sampler} ({steps or config.decoder.timesteps} steps)"
        )
    train = config.train
    for number, decay_steps in trainer.lr_decay_steps.items():
        if decay_steps is not None:
            lines.append(
                f"  lr U-Net {number}     {train.lr_schedule} from {train.for_unet('lr', number):g} to "
                f"{train.for_unet('lr_min_ratio', number):g} x it over {decay_steps} optimizer steps"
            )
    if trainer.posthoc is not None:
        lines.append(
            f"  post-hoc EMA   sigma_rel {', '.join(f'{s:g}' for s in trainer.posthoc.sigma_rels)}, "
            f"a snapshot every {trainer.posthoc.every_n_steps} updates"
        )
    return lines
