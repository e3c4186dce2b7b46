"""The sampling phases of a sharded run gather each U-Net once, not block by block for every call
(`dalle2_decoder.training.sharding.gathered`), and leave the U-Net as training needs it.

FSDP2 on one CPU process (gloo, world size 1): sharding, gathering and freeing happen as on many
processes (the parameters are swapped between their sharded DTensors and gathered plain tensors),
which is what is checked here; the multi-process runs are tests/test_sharded_training.py's.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dalle2_decoder.models.unet import Unet
from dalle2_decoder.runtime import Sharding
from dalle2_decoder.training import sharding


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("group") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def sharded_unet(reshard_after_forward: bool = True) -> Unet:
    torch.manual_seed(0)
    unet = Unet(
        dim=8, image_embed_dim=32, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8, cond_dim=16, num_resnet_blocks=1
    )
    how = Sharding(reshard_after_forward=reshard_after_forward)
    mesh = sharding.device_mesh(how, torch.device("cpu"), 1)
    return sharding.shard_unet(unet, mesh, sharding=how, mixed_precision="no")


def gathered_blocks(unet: Unet) -> list:
    """For each block: are its weights gathered (plain tensors) rather than its shards (DTensors)?"""
    from torch.distributed.tensor import DTensor

    return [not isinstance(next(block.parameters()), DTensor) for block in sharding.blocks(unet)]


@torch.no_grad()
def forward(unet: Unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 16, 16, generator=generator)
    embed = torch.rand(2, 32, generator=generator)
    return unet(image, torch.tensor([3, 7]), image_embed=embed)


def test_inside_gathered_the_weights_stay_gathered_between_calls_and_are_freed_at_the_end(process_group):
    unet = sharded_unet()
    expected = forward(unet)
    assert not any(gathered_blocks(unet))  # outside: each block frees its weights after its forward pass
    with sharding.gathered([unet], reshard_after_forward=True):
        first = forward(unet)
        assert all(gathered_blocks(unet))  # kept for the next sampler step: no second all-gather
        second = forward(unet)
    assert torch.equal(first, expected) and torch.equal(second, expected)  # the same weights, the same output
    # freed on the way out, the U-Net's own layers too, and the blocks reshard after forward again
    from torch.distributed.tensor import DTensor

    assert not any(gathered_blocks(unet)) and isinstance(next(unet.parameters()), DTensor)
    assert torch.equal(forward(unet), expected)
    assert not any(gathered_blocks(unet))


def test_gathered_puts_back_the_launchers_shard_grad_op_setting(process_group):
    """`fsdp_reshard_after_forward: false` keeps block weights from forward to backward in training:
    after a sampling phase it still does."""
    unet = sharded_unet(reshard_after_forward=False)
    with sharding.gathered([unet], reshard_after_forward=False):
        forward(unet)
    assert not any(gathered_blocks(unet))
    forward(unet)
    assert all(gathered_blocks(unet))
    sharding.reshard([unet])
    assert not any(gathered_blocks(unet))
