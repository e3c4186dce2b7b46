"""The GPU paths: bf16 and fp16 training, pinned-memory batches, sampling on CUDA.

Marked `cuda`: they need a CUDA GPU and fail (never skip) without one. `make test` deselects them
with `-m "not cuda"` on CPU machines; `bench/gpu_check.sh` runs them on a GPU machine.
"""

from __future__ import annotations

import math

import pytest
import torch

from dalle2_decoder.config import TrainDecoderConfig
from dalle2_decoder.tracking import read_file
from dalle2_decoder.training import TrainingRun

from .training_fixtures import EMBED_DIM, IMAGE_SIZE, tiny_config, write_tiny_demo

pytestmark = pytest.mark.cuda


def require_cuda() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU (deselect with -m 'not cuda' on CPU machines)"


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_tiny_demo(tmp_path_factory.mktemp("demo"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda_learns_with_finite_fp32_weights(demo_data, tmp_path, precision):
    require_cuda()
    data_path = tmp_path / "run"
    raw = tiny_config(demo_data, data_path, epochs=2, epoch_samples=24, device="cuda", mixed_precision=precision)
    config = TrainDecoderConfig.from_dict(raw)
    initial = {name: value.clone() for name, value in config.decoder.create().state_dict().items()}
    run = TrainingRun(config)
    assert run.accelerator.device.type == "cuda" and run.accelerator.mixed_precision == precision
    losses = []
    original = run.trainer.train_step

    def recording(batch):
        result = original(batch)
        # Inside the step: autocast ran the U-Net in half precision, the loss comes back as a tensor on the GPU.
        assert batch["image"].is_cuda
        losses.extend(float(loss) for loss in result.values())
        return result

    run.trainer.train_step = recording
    assert run.execute() == 0
    assert len(losses) == 12 and all(math.isfinite(loss) for loss in losses)
    weights = read_file(data_path / "latest.pth").state["trainer"]["decoder"]
    # Master weights stay fp32 (autocast, not a half-precision model), finite, and they moved.
    floats = {k: v for k, v in weights.items() if v.is_floating_point()}
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in floats.values())
    assert any(not torch.equal(floats[k].cpu(), initial[k]) for k in floats if k in initial)
    if precision == "fp16":  # fp16 needs loss scaling: the scaler's state is saved with the checkpoint
        assert run.accelerator.scaler is not None


def test_batches_arrive_in_pinned_memory_and_move_to_the_gpu(demo_data):
    require_cuda()
    from dalle2_decoder.data import create_dataloaders

    config = TrainDecoderConfig.from_dict(tiny_config(demo_data, "unused", device="cuda"))
    loaders = create_dataloaders(config.data, seed=0, pin_memory=True, uint8_images=True, epoch_samples=8)
    batches = list(loaders["train"])
    assert batches
    for batch in batches:
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        assert tensors and all(v.is_pinned() for v in tensors.values()), {k: v.is_pinned() for k, v in tensors.items()}
        moved = batch["image"].to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(moved.cpu(), batch["image"])


def test_sampling_on_cuda_is_reproducible_per_seed_and_in_range(demo_data):
    require_cuda()
    config = TrainDecoderConfig.from_dict(tiny_config(demo_data, "unused"))
    decoder = config.decoder.create().eval().to("cuda")
    embed = torch.randn(2, EMBED_DIM, generator=torch.Generator().manual_seed(0)).cuda()
    first = decoder.sample(image_embed=embed, seed=0)
    again = decoder.sample(image_embed=embed, seed=0)
    other = decoder.sample(image_embed=embed, seed=1)
    assert first.is_cuda and first.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert 0 <= first.min() and first.max() <= 1 and torch.isfinite(first).all()
    # The noise comes from a generator on the GPU: the same seed gives the same images, another seed others.
    assert torch.equal(first, again) and not torch.equal(first, other)
