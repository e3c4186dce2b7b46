"""Files written by one DALLE2-pytorch release: a trainer checkpoint, a model save and its samples.

Run through `generate.py --only releases` with an interpreter that has one DALLE2-pytorch
release installed (`releases.py` makes such interpreters, one release at a time); writes under
`tests/fixtures/reference/releases/<version>/`:

- `config.json`: the reference-format training config of the run (one tiny base U-Net, 8px; two,
  8 -> 16px, for releases whose trainer cannot take one U-Net);
- `checkpoint.pth`: the release's own `DecoderTrainer.save` (through its tracker where the
  release has `Tracker._save_state_dict`) after a few optimizer steps, EMA on;
- `model.pth`: the release's tracker `model` save of the same moment (EMA weights): a bare
  Decoder state dict before 1.0, `{"model", "version", "config", ...}` from 1.0 on;
- `samples.safetensors`: `trainer.sample` (EMA weights) for fixed image embeddings, with every
  Gaussian tensor the sampler drew, in the order drawn (`noise.0`, `noise.1`, ...), and for a
  cascade each U-Net's output (`stage.0`, ...);
- `meta.json`: release, torch and ema-pytorch versions, steps, what the tests need to know.

With `--cascade-base DIR` (a folder this module wrote for another release) it also writes
`cascade_samples.safetensors`, and, when the run above has one U-Net, `cascade_config.json` and
`cascade_model.pth`, the model save of a two-U-Net cascade (8 -> 16px) whose upsampler the tests
take out. `cascade_samples.safetensors` holds that release's own
upsampler stage run on the base images of DIR's `samples.safetensors` (the reference's
`Decoder.sample(image=..., start_at_unet_number=2)`; before that argument existed, the first
stage's output is replaced by those images), so the images are the two releases' parts chained
by the reference's sampler.

Needs no import of dalle2_decoder.
"""

from __future__ import annotations

import inspect
import json
import os
import pathlib
import random
import shutil
import sys
import tempfile
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from checkpoint_cases import recorded_noise  # noqa: E402

BATCH = 2
EMBED_DIM = 8
STEPS = 2
SAMPLE_BATCH = 2
TIMESTEPS = 16
EMA_RELEASES = ("1.0.6",)

# As small as the reference's U-Net gets with two resolution levels (so that downsampling and
# upsampling layers exist) and its fixed-width cross-attention (about 24k parameters). A checkpoint
# holds three copies of them (weights, two Adam moments), five with EMA: EMA is on only in the
# releases of EMA_RELEASES, to keep the fixtures small (its layout is the same in every release).
UNET = {
    "dim": 4,
    "image_embed_dim": EMBED_DIM,
    "cond_dim": 2,
    "channels": 3,
    "dim_mults": [1, 1],
    "resnet_groups": 2,
    "attn_dim_head": 4,
    "attn_heads": 1,
    "num_resnet_blocks": 0,
    "max_text_len": 4,
    "num_image_tokens": 1,
    "num_time_tokens": 1,
    "self_attn": [False, False],
}


def _learning_rate() -> float:
    """1e-3, or 5e-4 for releases before 0.16, whose DecoderTrainer asserts a rate below 1e-3."""
    from dalle2_pytorch.version import __version__

    return 5e-4 if tuple(int(p) for p in __version__.split(".")[:2]) < (0, 16) else 1e-3


def run_config(tracker_path: str, unets: int = 1, use_ema: bool = True) -> Dict:
    image_sizes = [8, 16][:unets]
    return {
        "seed": 0,
        "decoder": {
            "unets": [dict(UNET) for _ in range(unets)],
            "image_sizes": image_sizes,
            "timesteps": TIMESTEPS,
            "beta_schedule": ["cosine"] * unets,
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
            "lr": _learning_rate(),
            "wd": 0.01,
            "max_grad_norm": 0.5,
            "warmup_steps": 2,
            "device": "cpu",
            "use_ema": use_ema,
            "ema_beta": 0.99,
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


def _dump(model) -> Dict:
    return model.model_dump() if hasattr(model, "model_dump") else model.dict()


def _trainer_kwargs(config) -> Dict:
    """The train options the release's DecoderTrainer takes (its own train_decoder.py passes them on)."""
    from dalle2_pytorch.trainer import DecoderTrainer

    accepted = set(inspect.signature(DecoderTrainer.__init__).parameters)
    train = _dump(config.train)
    wanted = ("lr", "wd", "max_grad_norm", "warmup_steps", "use_ema", "ema_beta", "amp")
    return {key: train[key] for key in wanted if key in train and (key in accepted or key.startswith("ema_"))}


def train_and_save(config_dict: Dict, data_seed: int, with_metadata: bool):
    """STEPS optimizer steps of every U-Net, then the release's tracker saves (checkpoint and model)."""
    from accelerate import Accelerator
    from dalle2_pytorch.train_configs import TrainDecoderConfig
    from dalle2_pytorch.trainer import DecoderTrainer

    config = TrainDecoderConfig(**json.loads(json.dumps(config_dict)))
    torch.manual_seed(config.seed)
    decoder = config.decoder.create()
    trainer = DecoderTrainer(decoder=decoder, accelerator=Accelerator(cpu=True), **_trainer_kwargs(config))
    tracker = config.tracker.create(config, {"Distributed": False}, dummy_mode=False)
    if with_metadata and hasattr(tracker, "add_save_metadata"):  # what train_decoder.py adds from 1.0 on
        tracker.add_save_metadata(state_dict_key="config", metadata=_dump(config))

    generator = torch.Generator().manual_seed(data_seed)
    size = config_dict["decoder"]["image_sizes"][-1]
    images = torch.rand(STEPS, BATCH, 3, size, size, generator=generator)
    embeds = torch.randn(STEPS, BATCH, EMBED_DIM, generator=generator)
    torch.manual_seed(data_seed)
    random.seed(data_seed)
    trainer.train()
    for step in range(STEPS):
        for number in range(1, len(decoder.unets) + 1):
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


def _versions() -> Dict[str, str]:
    from importlib import metadata

    from dalle2_pytorch.version import __version__

    found = {"dalle2_pytorch": __version__, "torch": torch.__version__}
    for package in ("ema-pytorch", "pydantic", "accelerate", "packaging"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def generate(out_dir: pathlib.Path, cascade_base: Optional[pathlib.Path] = None) -> pathlib.Path:
    versions = _versions()
    target = (out_dir / versions["dalle2_pytorch"]).resolve()
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*"):
        if old.is_file() and (cascade_base is not None or not old.name.startswith("cascade_")):
            old.unlink()
    meta: Dict = {**versions, "steps_per_unet": STEPS}
    home = os.getcwd()
    with tempfile.TemporaryDirectory() as temp:
        os.chdir(temp)  # relative tracker paths: the recorded configs name no temporary folder
        try:
            trainer = _base(target, meta)
            if cascade_base is not None:
                _cascade(target, pathlib.Path(cascade_base).resolve(), meta, trainer)
        finally:
            os.chdir(home)
    (target / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return target


def _sample_with_noise(trainer, seed: int, **kwargs):
    noise: List[torch.Tensor] = []
    with recorded_noise(seed, noise):
        images = trainer.sample(cond_scale=1.0, **kwargs)
    return images, noise


def _stage_outputs(trainer) -> List[torch.Tensor]:
    """Record what each U-Net's sampling loop returns (its images in [0, 1]) on the next sample call."""
    decoder = trainer.accelerator.unwrap_model(trainer.decoder)
    original = decoder.p_sample_loop
    outputs: List[torch.Tensor] = []

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        outputs.append(out.detach().clone())
        return out

    decoder.p_sample_loop = recording
    return outputs


def _base(target: pathlib.Path, meta: Dict):
    from safetensors.torch import save_file

    use_ema = meta["dalle2_pytorch"] in EMA_RELEASES
    config = run_config(".tracker-data/run", use_ema=use_ema)
    try:
        trainer, data_path = train_and_save(config, data_seed=1, with_metadata=True)
    except TypeError as error:
        # 0.16.5 - 0.16.19 unpack `accelerator.prepare(*schedulers)` as a list, which fails for one U-Net:
        # those releases could only train cascades, so their run is one.
        meta["note"] = f"one U-Net fails in this release's DecoderTrainer ({error}); the run has two"
        config = run_config(".tracker-data/run", unets=2, use_ema=use_ema)
        trainer, data_path = train_and_save(config, data_seed=1, with_metadata=True)
    shutil.copy(data_path / "checkpoint.pth", target / "checkpoint.pth")
    shutil.copy(data_path / "model.pth", target / "model.pth")
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if hasattr(trainer, "steps"):
        meta["steps"] = trainer.steps.tolist()
    else:  # before 0.16: one `step` counter for all U-Nets together
        meta["steps"] = [int(trainer.step.item())] * len(config["decoder"]["unets"])
    meta["ema_steps"] = [int(getattr(ema, "step", -1)) for ema in trainer.ema_unets]

    image_embed = torch.randn(SAMPLE_BATCH, EMBED_DIM, generator=torch.Generator().manual_seed(2))
    stages = _stage_outputs(trainer)
    images, noise = _sample_with_noise(trainer, 3, image_embed=image_embed)
    tensors = {"image_embed": image_embed, "images": images.contiguous()}
    if len(stages) > 1:  # a cascade: each U-Net's output too (`stage.0` is the base U-Net's)
        tensors.update({f"stage.{index}": value.contiguous() for index, value in enumerate(stages)})
    tensors.update({f"noise.{index}": value.contiguous() for index, value in enumerate(noise)})
    save_file(tensors, str(target / "samples.safetensors"))
    meta["samples"] = {
        "cond_scale": 1.0,
        "weights": "EMA (trainer.sample)" if use_ema else "trained (no EMA in this run)",
        "num_noise": len(noise),
    }
    return trainer


def _cascade(target: pathlib.Path, base_dir: pathlib.Path, meta: Dict, trainer) -> None:
    from safetensors.torch import load_file, save_file

    upsampler = "U-Net 2 of model.pth"
    if len(trainer.accelerator.unwrap_model(trainer.decoder).unets) < 2:  # the base run has no upsampler
        config = run_config(".tracker-data/cascade", unets=2, use_ema=False)
        trainer, data_path = train_and_save(config, data_seed=4, with_metadata=True)
        shutil.copy(data_path / "model.pth", target / "cascade_model.pth")
        (target / "cascade_config.json").write_text(json.dumps(config, indent=2) + "\n")
        upsampler = "U-Net 2 of cascade_model.pth"

    base = load_file(str(base_dir / "samples.safetensors"))
    kwargs = {"image_embed": base["image_embed"]}
    decoder = trainer.accelerator.unwrap_model(trainer.decoder)
    if "start_at_unet_number" in inspect.signature(type(decoder).sample).parameters:
        kwargs.update(image=base["images"], start_at_unet_number=2)
        how = "Decoder.sample(image=base images, start_at_unet_number=2)"
    else:  # older releases: the first stage's loop gives the base images instead of sampling
        original = decoder.p_sample_loop
        calls = []

        def first_stage_replaced(unet, shape, *args, **more):
            calls.append(shape)
            if len(calls) == 1:
                return base["images"].clone()
            return original(unet, shape, *args, **more)

        decoder.p_sample_loop = first_stage_replaced
        how = "Decoder.sample with its first p_sample_loop returning the base images"
    images, noise = _sample_with_noise(trainer, 5, **kwargs)
    tensors = {"image_embed": base["image_embed"], "base_images": base["images"], "images": images.contiguous()}
    tensors.update({f"noise.{index}": value.contiguous() for index, value in enumerate(noise)})
    save_file(tensors, str(target / "cascade_samples.safetensors"))
    base_meta = json.loads((base_dir / "meta.json").read_text())
    meta["cascade"] = {
        "base_release": base_meta["dalle2_pytorch"],
        "upsampler": upsampler,
        "how": how,
        "num_noise": len(noise),
    }
