"""Reference checkpoints: files written by DALLE2-pytorch 1.15.6's own trainer and tracker.

Writes under `tests/fixtures/reference/checkpoints/`:

- `config.json`: the reference-format training config (decoder, train, tracker ...) both runs use;
- `checkpoint.pth`: the reference tracker's `checkpoint` save (DecoderTrainer.save plus the run's
  metadata) after a few optimizer steps of both U-Nets, EMA on;
- `model.pth`: the reference tracker's `model` save of the same moment (EMA weights, as the
  community's released decoders), with a `packaging.version.Version` in its metadata;
- `upsampler_checkpoint.pth`: a checkpoint of a run that trained only U-Net 2 (the reference
  replaces frozen U-Nets by `nn.Identity`, so U-Net 1 has no weights in it);
- `samples.safetensors`: `trainer.sample` (EMA weights) for fixed image embeddings, with every
  noise tensor the sampler drew, in the order drawn (`noise.0`, `noise.1`, ...);
- `meta.json`: what the tests need to know about the run (steps, EMA counters, noise order).

Run through `generate.py`; needs no import of dalle2_decoder.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import random
import shutil
import tempfile
from typing import Dict, List

import torch

BATCH = 4
EMBED_DIM = 32  # the demo dataset (used by the end-to-end test) needs at least 26
STEPS = 3
SAMPLE_BATCH = 2

# Tiny on purpose: a checkpoint holds five copies of the weights (weights, EMA online and averaged
# copies, two Adam moments). One resolution level keeps each U-Net near 23k parameters.
UNET = {
    "dim": 4,
    "image_embed_dim": EMBED_DIM,
    "cond_dim": 4,
    "channels": 3,
    "dim_mults": [1],
    "resnet_groups": 2,
    "attn_dim_head": 4,
    "attn_heads": 1,
    "num_resnet_blocks": 1,
}


def run_config(tracker_path: str, unet_training_mask=None) -> Dict:
    """A complete reference-format config: what a DALLE2-pytorch user has."""
    return {
        "seed": 0,
        "decoder": {
            "unets": [dict(UNET), dict(UNET)],
            "image_sizes": [8, 16],
            "timesteps": 32,
            # null: the reference's own rule (cosine, then linear for the last U-Net), which our default
            # (cosine for every U-Net, as the configuration reference documents) differs from
            "beta_schedule": None,
            "loss_type": "l2",
            "learned_variance": True,
        },
        "data": {
            "webdataset_base_url": "/data/shards/{}.tar",
            "img_embeddings_url": "/data/img_emb/",
            "num_workers": 0,
            "batch_size": BATCH,
            "start_shard": 0,
            "end_shard": 3,
            "shard_width": 5,
            "splits": {"train": 0.5, "val": 0.25, "test": 0.25},
        },
        "train": {
            "epochs": 1,
            "lr": 1e-3,
            "wd": 0.01,
            "max_grad_norm": 0.5,
            "warmup_steps": 2,
            "device": "cpu",
            "use_ema": True,
            "ema_beta": 0.99,
            "unet_training_mask": unet_training_mask,
            "save_every_n_samples": 1000,
        },
        "evaluate": {"n_evaluation_samples": 2},
        "tracker": {
            "data_path": tracker_path,
            "overwrite_data_path": True,
            "log": {"log_type": "console"},
            "save": [{"save_to": "local", "save_latest_to": "latest.pth", "save_type": "checkpoint"}],
        },
    }


# Keys of the train config that train_decoder.py consumes itself; the rest go to DecoderTrainer.
LOOP_KEYS = (
    "epoch_samples",
    "validation_samples",
    "save_immediately",
    "epochs",
    "n_sample_images",
    "save_every_n_samples",
    "unet_training_mask",
    "cond_scale",
)


@contextlib.contextmanager
def recorded_noise(seed: int, record: List[torch.Tensor]):
    """Route torch.randn / torch.randn_like through one seeded generator and keep every draw."""
    generator = torch.Generator().manual_seed(seed)
    original_randn, original_randn_like = torch.randn, torch.randn_like

    def randn(*size, **kwargs):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        dtype = kwargs.get("dtype") or torch.float32
        value = original_randn(tuple(shape), generator=generator, dtype=dtype)
        record.append(value.clone())
        return value.to(kwargs.get("device") or "cpu")

    def randn_like(tensor, **kwargs):
        value = original_randn(tuple(tensor.shape), generator=generator, dtype=tensor.dtype)
        record.append(value.clone())
        return value.to(tensor.device)

    torch.randn, torch.randn_like = randn, randn_like
    try:
        yield
    finally:
        torch.randn, torch.randn_like = original_randn, original_randn_like


def train_and_save(config_dict: Dict, work: pathlib.Path, data_seed: int):
    """Train STEPS optimizer steps as train_decoder.py does, then save through the reference tracker."""
    from accelerate import Accelerator
    from dalle2_pytorch.train_configs import TrainDecoderConfig
    from dalle2_pytorch.trainer import DecoderTrainer
    from torch import nn

    config = TrainDecoderConfig(**json.loads(json.dumps(config_dict)))
    torch.manual_seed(config.seed)
    decoder = config.decoder.create()
    mask = config.train.unet_training_mask or [True] * len(decoder.unets)
    for index, trained in enumerate(mask):
        if not trained:  # what train_decoder.py's move_unets does
            decoder.unets[index] = nn.Identity()
    kwargs = {key: value for key, value in config.train.model_dump().items() if key not in LOOP_KEYS}
    trainer = DecoderTrainer(decoder=decoder, accelerator=Accelerator(cpu=True), **kwargs)

    tracker = config.tracker.create(config, {"Distributed": False}, dummy_mode=False)
    tracker.add_save_metadata(state_dict_key="config", metadata=config.model_dump())

    generator = torch.Generator().manual_seed(data_seed)
    images = torch.rand(STEPS, BATCH, 3, 16, 16, generator=generator)
    embeds = torch.randn(STEPS, BATCH, EMBED_DIM, generator=generator)
    torch.manual_seed(data_seed)
    random.seed(data_seed)  # the reference draws its upsampler's blur from Python's generator
    trainer.train()
    for step in range(STEPS):
        for number, trained in enumerate(mask, start=1):
            if trained:
                trainer(images[step], image_embed=embeds[step], unet_number=number)
                trainer.update(unet_number=number)
    samples = STEPS * BATCH
    tracker.save(
        trainer,
        is_best=False,
        is_latest=True,
        epoch=0,
        sample=samples,
        next_task="train",
        validation_losses=[],
        samples_seen=samples,
    )
    return trainer, pathlib.Path(config.tracker.data_path)


def generate(out_dir: pathlib.Path) -> None:
    from dalle2_pytorch.version import __version__

    for old in out_dir.glob("*"):
        if old.is_file():
            old.unlink()
    meta: Dict = {"dalle2_pytorch": __version__, "torch": torch.__version__, "steps_per_trained_unet": STEPS}
    out_dir = out_dir.resolve()
    home = os.getcwd()
    with tempfile.TemporaryDirectory() as temp:
        temp = pathlib.Path(temp)
        # Relative tracker paths: the configs the files record do not name a temporary folder, so a
        # second run writes the same content (only torch's random serialization id differs).
        os.chdir(temp)
        try:
            _generate(out_dir, temp, meta)
        finally:
            os.chdir(home)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _generate(out_dir: pathlib.Path, temp: pathlib.Path, meta: Dict) -> None:
    from safetensors.torch import save_file

    # A run training both U-Nets: its checkpoint, its model save, and samples from it.
    config = run_config(".tracker-data/run")
    trainer, data_path = train_and_save(config, temp, data_seed=1)
    shutil.copy(data_path / "checkpoint.pth", out_dir / "checkpoint.pth")
    shutil.copy(data_path / "model.pth", out_dir / "model.pth")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    meta["steps"] = trainer.steps.tolist()
    meta["ema_steps"] = [int(ema.step) for ema in trainer.ema_unets]
    meta["lr_after"] = [trainer.optim0.param_groups[0]["lr"], trainer.optim1.param_groups[0]["lr"]]

    generator = torch.Generator().manual_seed(2)
    image_embed = torch.randn(SAMPLE_BATCH, EMBED_DIM, generator=generator)
    noise: List[torch.Tensor] = []
    with recorded_noise(3, noise):
        images = trainer.sample(image_embed=image_embed, cond_scale=1.0)
    tensors = {"image_embed": image_embed, "images": images.contiguous()}
    tensors.update({f"noise.{index}": value.contiguous() for index, value in enumerate(noise)})
    save_file(tensors, str(out_dir / "samples.safetensors"))
    meta["samples"] = {
        "cond_scale": 1.0,
        "weights": "EMA (trainer.sample default)",
        "noise_order": "for each U-Net: torch.randn(shape) for the start, then torch.randn_like(x) at each of "
        "the timesteps (from T-1 down to 0); noise.0 .. noise.N-1 in the order drawn",
        "num_noise": len(noise),
    }

    # A run training only the upsampler (U-Net 1 frozen and replaced by nn.Identity there).
    config = run_config(".tracker-data/upsampler", unet_training_mask=[False, True])
    trainer, data_path = train_and_save(config, temp, data_seed=4)
    shutil.copy(data_path / "checkpoint.pth", out_dir / "upsampler_checkpoint.pth")
    meta["upsampler_steps"] = trainer.steps.tolist()
