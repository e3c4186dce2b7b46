"""The DALL-E 2 decoder U-Net.

CONTRACT STUB: the signature below is the interface the configuration introspects
(`decoder.unets[i]` keys are checked against it). The model work replaces the body.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import nn


class Unet(nn.Module):
    def __init__(
        self,
        dim: int,
        *,
        image_embed_dim: Optional[int] = None,
        text_embed_dim: Optional[int] = None,
        cond_dim: Optional[int] = None,
        num_image_tokens: int = 4,
        num_time_tokens: int = 2,
        out_dim: Optional[int] = None,
        dim_mults: Sequence[int] = (1, 2, 4, 8),
        channels: int = 3,
        channels_out: Optional[int] = None,
        self_attn: Union[bool, Sequence[bool]] = False,
        attn_dim_head: int = 32,
        attn_heads: int = 16,
        lowres_cond: bool = False,
        lowres_noise_cond: bool = False,
        self_cond: bool = False,
        sparse_attn: bool = False,
        cosine_sim_cross_attn: bool = False,
        cosine_sim_self_attn: bool = False,
        attend_at_middle: bool = True,
        cond_on_text_encodings: bool = False,
        max_text_len: int = 256,
        cond_on_image_embeds: bool = False,
        add_image_embeds_to_time: bool = True,
        init_dim: Optional[int] = None,
        init_conv_kernel_size: int = 7,
        resnet_groups: int = 8,
        resnet_weight_standardization: bool = False,
        num_resnet_blocks: Union[int, Sequence[int]] = 2,
        init_cross_embed: bool = True,
        init_cross_embed_kernel_sizes: Sequence[int] = (3, 7, 15),
        cross_embed_downsample: bool = False,
        cross_embed_downsample_kernel_sizes: Sequence[int] = (2, 4),
        memory_efficient: bool = False,
        scale_skip_connection: bool = False,
        pixel_shuffle_upsample: bool = True,
        final_conv_kernel_size: int = 1,
        combine_upsample_fmaps: bool = False,
        checkpoint_during_training: bool = False,
    ):
        super().__init__()
        raise NotImplementedError("Unet: contract stub, replaced by the model work")
