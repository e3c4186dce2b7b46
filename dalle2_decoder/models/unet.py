"""The DALL-E 2 decoder U-Net (unCLIP, Ramesh et al. 2022, sec. 2.1).

Conditioning, as the paper describes it: the CLIP image embedding is projected and added to the
timestep embedding (which drives every ResNet block through a FiLM scale/shift), and projected
into `num_image_tokens` extra tokens; those, the time tokens and the (optional) projected CLIP
text encodings form the context that ResNet blocks below the top resolution cross-attend to.
Classifier-free guidance replaces dropped conditioning by learned null embeddings.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import LinearAttention2d, SelfAttention2d
from .layers import CrossEmbed, ConvBlock, Downsample, NearestUpsample, PixelShuffleUpsample, ResnetBlock, SinusoidalPosEmb


def _per_level(value: Any, levels: int, name: str) -> list:
    """One value for every resolution level, or a list with exactly one per level."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"Unet: {name} has {len(value)} entries but dim_mults has {levels} levels")
        return list(value)
    return [value] * levels


class Unet(nn.Module):
    """Denoising U-Net of one stage of the decoder cascade.

    Args (names follow DALLE2-pytorch so that its configs load unchanged):
        dim: channels of the first level; level i has dim * dim_mults[i].
        image_embed_dim: width of the CLIP image embedding (required when conditioning on it).
        text_embed_dim: width of the CLIP text encodings (defaults to image_embed_dim).
        cond_dim: width of the context tokens that cross-attention reads (defaults to dim).
        num_image_tokens: context tokens the image embedding is projected into.
        num_time_tokens: context tokens the timestep embedding is projected into.
        out_dim: legacy alias of channels_out.
        dim_mults: channel multiplier of each resolution level (one level per entry).
        channels: image channels.
        channels_out: output channels (the Decoder sets 2 * channels for learned variance).
        self_attn: full self-attention per level, one bool for all levels or a per-level list.
        attn_dim_head: width of one self-attention head.
        attn_heads: self-attention heads.
        lowres_cond: take the upsampled low-resolution image as extra input (set by the Decoder on upsamplers).
        lowres_noise_cond: condition on the noise level of the augmented low-res image (set by the Decoder).
        self_cond: take a previous x_0 estimate as extra input (self-conditioning, Chen et al. 2022).
        sparse_attn: linear attention at levels without full self-attention.
        cosine_sim_cross_attn: cross-attention on l2-normalised queries and keys with a fixed scale.
        cosine_sim_self_attn: self-attention on l2-normalised queries and keys with a fixed scale.
        attend_at_middle: self-attention between the two ResNet blocks of the bottleneck.
        cond_on_text_encodings: cross-attend to projected text encodings.
        max_text_len: text tokens beyond this are dropped; also the length of the null text embedding.
        cond_on_image_embeds: use the image embedding (the Decoder turns it on unless unconditional).
        add_image_embeds_to_time: also add the projected image embedding to the time embedding.
        init_dim: channels after the first convolution (defaults to dim).
        init_conv_kernel_size: kernel of the first convolution when init_cross_embed is False.
        resnet_groups: GroupNorm groups, one int or a per-level list.
        resnet_weight_standardization: weight-standardised convolutions in the ResNet blocks.
        num_resnet_blocks: ResNet blocks per level (after the entry block), one int or a per-level list.
        init_cross_embed: first layer is a multi-kernel cross-embedding instead of a single convolution.
        init_cross_embed_kernel_sizes: kernels of that cross-embedding.
        cross_embed_downsample: downsample with strided multi-kernel convolutions instead of space-to-depth.
        cross_embed_downsample_kernel_sizes: kernels of those downsampling convolutions.
        memory_efficient: downsample at the start of each level, so every level runs at half the resolution.
        scale_skip_connection: multiply skip connections by 2^-0.5 before concatenation.
        pixel_shuffle_upsample: upsample with a 1x1 conv and depth-to-space instead of nearest + 3x3 conv.
        final_conv_kernel_size: kernel of the output convolution.
        combine_upsample_fmaps: feed every up level's feature map (resized) into the final block.
        checkpoint_during_training: gradient checkpointing of blocks while training (saves memory at 256px+).
        cross_attn_heads: heads of the ResNet blocks' cross-attention to the context (the reference fixes 8).
        cross_attn_dim_head: head width of that cross-attention (the reference fixes 64).
    """

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
        resnet_groups: Union[int, Sequence[int]] = 8,
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
        cross_attn_heads: int = 8,
        cross_attn_dim_head: int = 64,
    ):
        super().__init__()
        # Kept so that the Decoder can rebuild this U-Net with the settings it imposes (with_settings).
        self._config: Dict[str, Any] = {k: v for k, v in locals().items() if k not in ("self", "__class__")}

        levels = len(dim_mults)
        if levels < 1:
            raise ValueError("Unet: dim_mults needs at least one level")
        if cond_on_image_embeds and image_embed_dim is None:
            raise ValueError("Unet: image_embed_dim is required to condition on image embeddings")
        if cond_on_text_encodings and text_embed_dim is None and image_embed_dim is None:
            raise ValueError("Unet: text_embed_dim is required when cond_on_text_encodings is true")

        self.channels = channels
        self.channels_out = channels_out if channels_out is not None else (out_dim if out_dim is not None else channels)
        self.lowres_cond = lowres_cond
        self.lowres_noise_cond = lowres_noise_cond
        self.self_cond = self_cond
        self.cond_on_image_embeds = cond_on_image_embeds
        self.add_image_embeds_to_time = cond_on_image_embeds and add_image_embeds_to_time
        self.cond_on_text_encodings = cond_on_text_encodings
        self.max_text_len = max_text_len
        self.num_time_tokens = num_time_tokens
        self.num_image_tokens = num_image_tokens
        self.memory_efficient = memory_efficient
        self.checkpoint_during_training = checkpoint_during_training
        self.skip_scale = 2**-0.5 if scale_skip_connection else 1.0
        # Every level but the last halves the resolution (memory_efficient: every level).
        self.downsample_factor = 2 ** (levels if memory_efficient else levels - 1)

        init_dim = init_dim if init_dim is not None else dim
        cond_dim = cond_dim if cond_dim is not None else dim
        text_embed_dim = text_embed_dim if text_embed_dim is not None else image_embed_dim
        time_cond_dim = dim * 4
        self.cond_dim = cond_dim

        # ---------------------------------------------------------------- conditioning
        self.time_embed = nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, time_cond_dim), nn.SiLU())
        # Upsamplers with noise-augmented inputs are told how noisy that input is (cascaded diffusion sec. 4.2).
        self.lowres_noise_embed = (
            nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, time_cond_dim), nn.SiLU()) if lowres_noise_cond else None
        )
        self.to_time_cond = nn.Linear(time_cond_dim, time_cond_dim)
        self.to_time_tokens = nn.Linear(time_cond_dim, cond_dim * num_time_tokens)
        if cond_on_image_embeds:
            self.image_to_tokens = nn.Linear(image_embed_dim, cond_dim * num_image_tokens)
            self.null_image_tokens = nn.Parameter(torch.randn(num_image_tokens, cond_dim))
        if self.add_image_embeds_to_time:
            self.image_to_hiddens = nn.Sequential(nn.Linear(image_embed_dim, time_cond_dim), nn.SiLU())
            self.null_image_hiddens = nn.Parameter(torch.randn(time_cond_dim))
        if cond_on_text_encodings:
            self.text_to_tokens = nn.Linear(text_embed_dim, cond_dim)
            self.null_text_tokens = nn.Parameter(torch.randn(max_text_len, cond_dim))
        self.context_norm = nn.LayerNorm(cond_dim)

        # ---------------------------------------------------------------- network
        in_channels = channels * (1 + int(lowres_cond) + int(self_cond))
        if init_cross_embed:
            self.init_conv: nn.Module = CrossEmbed(in_channels, init_dim, init_cross_embed_kernel_sizes)
        else:
            self.init_conv = nn.Conv2d(in_channels, init_dim, init_conv_kernel_size, padding=init_conv_kernel_size // 2)

        dims = [init_dim] + [dim * m for m in dim_mults]
        in_out = list(zip(dims[:-1], dims[1:]))
        self_attn_per_level = _per_level(self_attn, levels, "self_attn")
        blocks_per_level = _per_level(num_resnet_blocks, levels, "num_resnet_blocks")
        groups_per_level = _per_level(resnet_groups, levels, "resnet_groups")

        def resnet(d_in: int, d_out: int, groups: int, cross: bool) -> ResnetBlock:
            return ResnetBlock(
                d_in,
                d_out,
                time_cond_dim=time_cond_dim,
                groups=groups,
                cond_dim=cond_dim if cross else None,
                attn_heads=cross_attn_heads,
                attn_dim_head=cross_attn_dim_head,
                cosine_sim_cross_attn=cosine_sim_cross_attn,
                weight_standardization=resnet_weight_standardization,
            )

        def level_attention(d: int, level: int) -> Optional[nn.Module]:
            if self_attn_per_level[level]:
                return SelfAttention2d(d, heads=attn_heads, dim_head=attn_dim_head, cosine_sim=cosine_sim_self_attn)
            if sparse_attn:
                return LinearAttention2d(d, heads=attn_heads, dim_head=attn_dim_head)
            return None

        def downsample(d_in: int, d_out: int) -> nn.Module:
            if cross_embed_downsample:
                return CrossEmbed(d_in, d_out, cross_embed_downsample_kernel_sizes, stride=2)
            return Downsample(d_in, d_out)

        upsample = PixelShuffleUpsample if pixel_shuffle_upsample else NearestUpsample

        self.downs = nn.ModuleList()
        skip_dims: List[List[int]] = []
        for level, (d_in, d_out) in enumerate(in_out):
            is_last = level == levels - 1
            # The top resolution skips cross-attention: it would cost the most and the paper's
            # conditioning reaches it through the FiLM time/image vector anyway.
            cross = level > 0
            work = d_out if memory_efficient else d_in
            groups = groups_per_level[level]
            stage = nn.Module()
            stage.pre = downsample(d_in, d_out) if memory_efficient else None
            stage.entry = resnet(work, work, groups, cross=False)
            stage.blocks = nn.ModuleList(resnet(work, work, groups, cross) for _ in range(blocks_per_level[level]))
            stage.attn = level_attention(work, level)
            if memory_efficient:
                stage.post = None
            elif is_last:
                stage.post = nn.Conv2d(d_in, d_out, 3, padding=1)  # widen to the bottleneck width, same resolution
            else:
                stage.post = downsample(d_in, d_out)
            self.downs.append(stage)
            skip_dims.append([work] * (blocks_per_level[level] + 1))

        mid_dim = dims[-1]
        self.mid_block1 = resnet(mid_dim, mid_dim, groups_per_level[-1], cross=True)
        self.mid_attn = (
            SelfAttention2d(mid_dim, heads=attn_heads, dim_head=attn_dim_head, cosine_sim=cosine_sim_self_attn)
            if attend_at_middle
            else None
        )
        self.mid_block2 = resnet(mid_dim, mid_dim, groups_per_level[-1], cross=True)

        self.ups = nn.ModuleList()
        self.upsample_combiners = nn.ModuleList() if combine_upsample_fmaps else None
        for level in reversed(range(levels)):
            d_in, d_out = in_out[level]
            groups = groups_per_level[level]
            stage = nn.Module()
            stage.blocks = nn.ModuleList(resnet(d_out + skip, d_out, groups, cross=level > 0) for skip in reversed(skip_dims[level]))
            stage.attn = level_attention(d_out, level)
            stage.post = upsample(d_out, d_in) if (level > 0 or memory_efficient) else None
            self.ups.append(stage)
            if self.upsample_combiners is not None:
                self.upsample_combiners.append(ConvBlock(d_out, dim, groups_per_level[0]))

        top_dim = init_dim if memory_efficient else in_out[0][1]
        final_in = top_dim + init_dim + (dim * levels if combine_upsample_fmaps else 0)
        self.final_block = resnet(final_in, dim, groups_per_level[0], cross=False)
        self.final_conv = nn.Conv2d(dim, self.channels_out, final_conv_kernel_size, padding=final_conv_kernel_size // 2)
        # Zero output at init: the first prediction is 0 (the mean of eps / v), which keeps early steps stable.
        nn.init.zeros_(self.final_conv.weight)
        nn.init.zeros_(self.final_conv.bias)

    # -------------------------------------------------------------------- construction helpers
    @property
    def config(self) -> Dict[str, Any]:
        """The constructor arguments of this U-Net."""
        return dict(self._config)

    def with_settings(self, **overrides: Any) -> "Unet":
        """This U-Net if it already has these settings, else a fresh one built with them."""
        changed = {k: v for k, v in overrides.items() if self._config[k] != v}
        if not changed:
            return self
        return Unet(**{**self._config, **changed})

    # -------------------------------------------------------------------- forward
    def _run(self, module: nn.Module, *args: Any) -> torch.Tensor:
        if self.checkpoint_during_training and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    @staticmethod
    def _keep_mask(batch: int, drop_prob: float, device: torch.device) -> Optional[torch.Tensor]:
        """Which samples keep their conditioning; None means all (no masking work at all)."""
        if drop_prob <= 0:
            return None
        if drop_prob >= 1:
            return torch.zeros(batch, dtype=torch.bool, device=device)
        return torch.rand(batch, device=device) >= drop_prob

    def forward(
        self,
        x: torch.Tensor,
        time: torch.Tensor,
        *,
        image_embed: Optional[torch.Tensor] = None,
        text_encodings: Optional[torch.Tensor] = None,
        text_mask: Optional[torch.Tensor] = None,
        lowres_cond_img: Optional[torch.Tensor] = None,
        lowres_noise_level: Optional[torch.Tensor] = None,
        self_cond: Optional[torch.Tensor] = None,
        image_cond_drop_prob: float = 0.0,
        text_cond_drop_prob: float = 0.0,
    ) -> torch.Tensor:
        """Predict the network target for noisy images x (B, C, H, W) at integer timesteps time (B,).

        Conditioning of each sample is replaced by the null embeddings with the given probabilities.
        """
        image_keep = self._keep_mask(x.shape[0], image_cond_drop_prob, x.device)
        text_keep = self._keep_mask(x.shape[0], text_cond_drop_prob, x.device)
        return self._forward(
            x, time, image_embed, text_encodings, text_mask, lowres_cond_img, lowres_noise_level, self_cond, image_keep, text_keep
        )

    def forward_with_cond_scale(self, x: torch.Tensor, time: torch.Tensor, *, cond_scale: float = 1.0, **kwargs: Any) -> torch.Tensor:
        """Classifier-free guidance (Ho & Salimans 2022, eq. 6): null + cond_scale * (cond - null).

        Conditional and null predictions run as one doubled batch. Only the first `channels`
        outputs are guided; learned-variance outputs come from the conditional prediction.
        """
        if cond_scale == 1:
            return self.forward(x, time, **kwargs)
        b = x.shape[0]

        def twice(value: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if value is None else torch.cat([value, value], dim=0)

        keep = torch.cat([torch.ones(b, dtype=torch.bool, device=x.device), torch.zeros(b, dtype=torch.bool, device=x.device)])
        out = self._forward(
            twice(x),
            twice(time),
            twice(kwargs.get("image_embed")),
            twice(kwargs.get("text_encodings")),
            twice(kwargs.get("text_mask")),
            twice(kwargs.get("lowres_cond_img")),
            twice(kwargs.get("lowres_noise_level")),
            twice(kwargs.get("self_cond")),
            keep,
            keep,
        )
        cond, null = out.chunk(2, dim=0)
        guided = null[:, : self.channels] + (cond[:, : self.channels] - null[:, : self.channels]) * cond_scale
        return torch.cat([guided, cond[:, self.channels :]], dim=1)

    def _conditioning(
        self,
        time: torch.Tensor,
        image_embed: Optional[torch.Tensor],
        text_encodings: Optional[torch.Tensor],
        text_mask: Optional[torch.Tensor],
        lowres_noise_level: Optional[torch.Tensor],
        image_keep: Optional[torch.Tensor],
        text_keep: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The FiLM vector (B, time_cond_dim) and the context tokens (B, M, cond_dim)."""
        b = time.shape[0]
        hiddens = self.time_embed(time)
        if self.lowres_noise_embed is not None:
            if lowres_noise_level is None:
                raise ValueError("Unet: lowres_noise_level is required (lowres_noise_cond is on)")
            hiddens = hiddens + self.lowres_noise_embed(lowres_noise_level)
        tokens = [self.to_time_tokens(hiddens).reshape(b, self.num_time_tokens, -1)]

        if self.cond_on_image_embeds:
            if image_embed is None:
                raise ValueError("Unet: image_embed is required (this U-Net is conditioned on image embeddings)")
            image_tokens = self.image_to_tokens(image_embed).reshape(b, self.num_image_tokens, -1)
            if image_keep is not None:
                image_tokens = torch.where(image_keep[:, None, None], image_tokens, self.null_image_tokens.to(image_tokens.dtype))
            tokens.append(image_tokens)
            if self.add_image_embeds_to_time:
                image_hiddens = self.image_to_hiddens(image_embed)
                if image_keep is not None:
                    image_hiddens = torch.where(image_keep[:, None], image_hiddens, self.null_image_hiddens.to(image_hiddens.dtype))
                hiddens = hiddens + image_hiddens

        if self.cond_on_text_encodings:
            if text_encodings is None:
                # No text at all (e.g. unconditional sampling): every sample attends to the null text.
                tokens.append(self.null_text_tokens[None].expand(b, -1, -1).to(tokens[0].dtype))
            else:
                text_encodings = text_encodings[:, : self.max_text_len]
                n = text_encodings.shape[1]
                text_tokens = self.text_to_tokens(text_encodings)
                keep = None if text_mask is None else text_mask[:, :n, None].bool()
                if text_keep is not None:
                    keep = text_keep[:, None, None] if keep is None else keep & text_keep[:, None, None]
                if keep is not None:
                    # Padding and dropped text become null tokens rather than an attention mask, so
                    # SDPA keeps its fused mask-free kernels.
                    text_tokens = torch.where(keep, text_tokens, self.null_text_tokens[:n].to(text_tokens.dtype))
                tokens.append(text_tokens)

        context = self.context_norm(torch.cat(tokens, dim=1))
        return self.to_time_cond(hiddens), context

    def _forward(
        self,
        x: torch.Tensor,
        time: torch.Tensor,
        image_embed: Optional[torch.Tensor],
        text_encodings: Optional[torch.Tensor],
        text_mask: Optional[torch.Tensor],
        lowres_cond_img: Optional[torch.Tensor],
        lowres_noise_level: Optional[torch.Tensor],
        self_cond: Optional[torch.Tensor],
        image_keep: Optional[torch.Tensor],
        text_keep: Optional[torch.Tensor],
    ) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height % self.downsample_factor or width % self.downsample_factor:
            raise ValueError(f"Unet: image size {height}x{width} must be divisible by {self.downsample_factor} for these dim_mults")
        time_cond, context = self._conditioning(time, image_embed, text_encodings, text_mask, lowres_noise_level, image_keep, text_keep)

        inputs = [x]
        if self.lowres_cond:
            if lowres_cond_img is None:
                raise ValueError("Unet: lowres_cond_img is required (this U-Net is an upsampler)")
            inputs.append(lowres_cond_img.to(x.dtype))
        if self.self_cond:
            inputs.append(torch.zeros_like(x) if self_cond is None else self_cond.to(x.dtype))
        h = self.init_conv(torch.cat(inputs, dim=1) if len(inputs) > 1 else x)
        init_h = h

        skips: List[torch.Tensor] = []
        for stage in self.downs:
            if stage.pre is not None:
                h = stage.pre(h)
            h = self._run(stage.entry, h, time_cond)
            for block in stage.blocks:
                skips.append(h)
                h = self._run(block, h, time_cond, context)
            if stage.attn is not None:
                h = self._run(stage.attn, h)
            skips.append(h)
            if stage.post is not None:
                h = stage.post(h)

        h = self._run(self.mid_block1, h, time_cond, context)
        if self.mid_attn is not None:
            h = self._run(self.mid_attn, h)
        h = self._run(self.mid_block2, h, time_cond, context)

        combined: List[torch.Tensor] = []
        for i, stage in enumerate(self.ups):
            for block in stage.blocks:
                h = self._run(block, torch.cat([h, skips.pop() * self.skip_scale], dim=1), time_cond, context)
            if stage.attn is not None:
                h = self._run(stage.attn, h)
            if self.upsample_combiners is not None:
                combined.append(self.upsample_combiners[i](h))
            if stage.post is not None:
                h = stage.post(h)

        final_inputs = [h, init_h]
        final_inputs += [F.interpolate(c, size=h.shape[-2:], mode="nearest") for c in combined]
        h = self._run(self.final_block, torch.cat(final_inputs, dim=1), time_cond)
        return self.final_conv(h)
