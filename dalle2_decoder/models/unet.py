"""The DALL-E 2 decoder U-Net (unCLIP, Ramesh et al. 2022, sec. 2.1), architecture of DALLE2-pytorch 1.15.6.

Conditioning, as the paper describes it: the CLIP image embedding is projected and added to the
timestep embedding (the FiLM vector of every ResNet block), and projected into `num_image_tokens`
extra tokens; those and the time tokens form the context that ResNet blocks below the top
resolution cross-attend to, and the bottleneck additionally attends to the projected CLIP text
encodings. Classifier-free guidance replaces dropped conditioning by learned null embeddings.

Same constructor options, same modules, same parameter names and the same function as the
reference, so that its configs build the same network and its weights load unchanged; the
extensions of ours are options that are off by default (see the `Unet` docstring).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..common.problems import raise_problems
from ._compat import warn_no_effect
from .layers import ChanLayerNorm, CrossEmbedLayer, LayerNorm, SinusoidalPosEmb, UpsampleCombiner, resize_cubic
from .lowres import resize_image
from .releases import describe, unet_differences
from .unet_blocks import LevelBuilder, block_runner, downsample_factor, image_size_problems
from .unet_conditioning import Conditioning, Reshape, condition, keep_mask


class Unet(nn.Module):
    """Denoising U-Net of one stage of the decoder cascade.

    Every option of DALLE2-pytorch 1.15.6's `Unet`, with its default and its effect (the module
    tree and parameter names are the reference's, so `Unet(**kwargs)` here and there have equal
    parameter counts and interchangeable state dicts).

    Args:
        dim: channels of the first level; level i has dim * dim_mults[i]. Time embeddings are 4 * dim wide.
        image_embed_dim: width of the CLIP image embedding (required when conditioning on it).
        text_embed_dim: width of the CLIP text encodings (required with cond_on_text_encodings; if
            left out, image_embed_dim is used, where the reference would stop with an assertion).
        cond_dim: width of the context tokens that cross-attention reads (defaults to dim). When it
            equals image_embed_dim, the image embedding is used as tokens without a projection (as in
            the reference): a (B, num_image_tokens, cond_dim) embedding as it is, a (B, cond_dim) one
            repeated as every image token.
        num_image_tokens: context tokens the image embedding is projected into.
        num_time_tokens: context tokens the timestep embedding is projected into.
        out_dim: accepted and ignored, as in the reference (use channels_out).
        dim_mults: channel multiplier of each resolution level (one level per entry). The final
            block expects the top level to have dim channels (dim_mults[0] == 1, init_dim == dim),
            as in the reference (which fails at the first forward otherwise; this is checked here).
        channels: image channels.
        channels_out: output channels (defaults to channels; the Decoder sets 2 * channels for learned variance).
        self_attn: full self-attention per level, one bool for all levels or a per-level list.
        attn_dim_head: width of one self-attention head (one key/value head is shared by all query heads).
        attn_heads: self-attention query heads.
        lowres_cond: take the upsampled low-resolution image as extra input, at the start and
            before the output convolution (set by the Decoder on upsamplers).
        lowres_noise_cond: add an embedding of the low-res image's noise level to the time vector (set by the Decoder).
        self_cond: take a previous x_0 estimate as extra input (self-conditioning, Chen et al. 2022).
        sparse_attn: linear attention at levels without full self-attention.
        cosine_sim_cross_attn: cross-attention on l2-normalised queries and keys with a fixed scale of 16.
        cosine_sim_self_attn: self-attention on l2-normalised queries and keys with a fixed scale of 16.
        attend_at_middle: accepted and ignored, as in the reference: the bottleneck always has
            self-attention (see respect_attend_at_middle).
        cond_on_text_encodings: the bottleneck cross-attends to projected text encodings too.
        max_text_len: text tokens beyond this are dropped; shorter text is padded with null tokens to this length.
        cond_on_image_embeds: use the image embedding (the Decoder turns it on for U-Net 1 unless unconditional).
        add_image_embeds_to_time: also add the projected image embedding to the time vector.
        init_dim: channels after the first layer (defaults to dim).
        init_conv_kernel_size: kernel of the first convolution when init_cross_embed is False.
        resnet_groups: GroupNorm groups, one int or a per-level list.
        resnet_weight_standardization: weight-standardised convolutions in the ResNet blocks.
        num_resnet_blocks: ResNet blocks per level after the level's first block, one int or a per-level list.
        init_cross_embed: first layer is a multi-kernel cross-embedding instead of a single convolution.
        init_cross_embed_kernel_sizes: kernels of that cross-embedding (all odd).
        cross_embed_downsample: downsample with strided multi-kernel convolutions instead of space-to-depth.
        cross_embed_downsample_kernel_sizes: kernels of those downsampling convolutions (all even).
        memory_efficient: downsample at the start of each level (so every level runs at half the
            resolution) after an extra ResNet block at full resolution.
        scale_skip_connection: multiply skip connections by 2^-0.5 before concatenation (Imagen).
        pixel_shuffle_upsample: upsample with a 1x1 conv and depth-to-space instead of nearest + 3x3 conv.
        final_conv_kernel_size: kernel of the output convolution.
        combine_upsample_fmaps: feed every up level's feature map (resized) into the final block (U-Net squared).
        checkpoint_during_training: gradient checkpointing of the ResNet blocks and bottleneck
            attention while training (saves activation memory at high resolution).
        cross_attn_heads: (ours) heads of the ResNet blocks' cross-attention; 8 in the reference.
        cross_attn_dim_head: (ours) head width of that cross-attention; 64 in the reference.
        respect_attend_at_middle: (ours, off by default) make attend_at_middle=False remove the
            bottleneck self-attention, as its name promises; the reference ignores it.
        reference_release: (ours, off by default) build the U-Net as that DALLE2-pytorch release did
            (e.g. "1.1.0": its downsampling layout and self-attention scale), so that weights it
            trained load and compute what they computed there; None is 1.15.6's U-Net. Set from the
            version a reference file records when it is loaded; `models.releases` lists the differences.
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
        respect_attend_at_middle: bool = False,
        reference_release: Optional[str] = None,
    ):
        super().__init__()
        # Kept so that the Decoder can rebuild this U-Net with the settings it imposes (with_settings).
        self._config: Dict[str, Any] = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        warn_no_effect("Unet", "out_dim", out_dim, None)
        if not respect_attend_at_middle:
            warn_no_effect("Unet", "attend_at_middle", attend_at_middle, True)

        release = unet_differences(reference_release)
        self.reference_release = reference_release
        self.release_differences = describe(reference_release)
        self.final_lowres_input = lowres_cond and not release.no_final_lowres_input
        self.cubic_lowres_input = release.cubic_lowres_input
        self.unclamped_lowres_input = release.unclamped_lowres_input
        self.unmasked_text_padding = release.unmasked_text_padding
        levels = len(dim_mults)
        if levels < 1:
            raise ValueError("Unet: dim_mults needs at least one level")
        if cond_on_image_embeds and image_embed_dim is None:
            raise ValueError("Unet: image_embed_dim is required to condition on image embeddings")
        if cond_on_text_encodings and text_embed_dim is None and image_embed_dim is None:
            raise ValueError("Unet: text_embed_dim is required when cond_on_text_encodings is true")

        self.channels = channels
        self.channels_out = channels_out if channels_out is not None else channels
        self.lowres_cond = lowres_cond
        self.lowres_noise_cond = lowres_noise_cond
        self.self_cond = self_cond
        self.cond_on_image_embeds = cond_on_image_embeds
        self.cond_on_text_encodings = cond_on_text_encodings
        self.max_text_len = max_text_len
        self.checkpoint_during_training = checkpoint_during_training
        self.skip_connect_scale = 2**-0.5 if scale_skip_connection else 1.0
        self.downsample_factor = downsample_factor(levels, memory_efficient)

        init_dim = init_dim if init_dim is not None else dim
        # The final block is built for dim + dim input channels (the last up level's output and the
        # first layer's): anything else would only fail at the first forward, as in the reference.
        top_channels = init_dim if memory_efficient else dim * dim_mults[0]
        if top_channels + init_dim != 2 * dim:
            raise ValueError(
                f"Unet: init_dim={init_dim} with dim={dim}, dim_mults[0]={dim_mults[0]}"
                f"{', memory_efficient' if memory_efficient else ''} gives the final block {top_channels + init_dim} "
                f"input channels instead of {2 * dim}; use init_dim == dim and dim_mults[0] == 1"
            )
        cond_dim = cond_dim if cond_dim is not None else dim
        text_embed_dim = text_embed_dim if text_embed_dim is not None else image_embed_dim
        time_cond_dim = dim * 4
        self.text_embed_dim = text_embed_dim if cond_on_text_encodings else None

        # ---------------------------------------------------------------- first layer
        in_channels = channels * (1 + int(lowres_cond) + int(self_cond))
        if init_cross_embed:
            self.init_conv: nn.Module = CrossEmbedLayer(in_channels, init_dim, init_cross_embed_kernel_sizes, stride=1)
        else:
            self.init_conv = nn.Conv2d(in_channels, init_dim, init_conv_kernel_size, padding=init_conv_kernel_size // 2)

        # ---------------------------------------------------------------- conditioning
        self.to_time_hiddens = nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, time_cond_dim), nn.GELU())
        self.to_time_tokens = nn.Sequential(
            nn.Linear(time_cond_dim, cond_dim * num_time_tokens), Reshape(num_time_tokens)
        )
        self.to_time_cond = nn.Sequential(nn.Linear(time_cond_dim, time_cond_dim))
        self.image_to_tokens: nn.Module = (
            nn.Sequential(nn.Linear(image_embed_dim, cond_dim * num_image_tokens), Reshape(num_image_tokens))
            if cond_on_image_embeds and image_embed_dim != cond_dim
            else nn.Identity()
        )
        self.to_image_hiddens = (
            nn.Sequential(nn.Linear(image_embed_dim, time_cond_dim), nn.GELU())
            if cond_on_image_embeds and add_image_embeds_to_time
            else None
        )
        # Two token sets, each normalised: time + image tokens for the levels, plus text at the bottleneck.
        self.norm_cond = nn.LayerNorm(cond_dim)
        self.norm_mid_cond = nn.LayerNorm(cond_dim)
        self.text_to_cond = nn.Linear(text_embed_dim, cond_dim) if cond_on_text_encodings else None
        # Upsamplers with noise-augmented inputs are told how noisy that input is (Imagen, cascaded diffusion sec. 4.2).
        self.to_lowres_noise_cond = (
            nn.Sequential(
                SinusoidalPosEmb(dim), nn.Linear(dim, time_cond_dim), nn.GELU(), nn.Linear(time_cond_dim, time_cond_dim)
            )
            if lowres_noise_cond
            else None
        )
        # Classifier-free guidance: what dropped conditioning is replaced by (always allocated, as in the reference).
        self.null_image_embed = nn.Parameter(torch.randn(1, num_image_tokens, cond_dim))
        self.null_image_hiddens = nn.Parameter(torch.randn(1, time_cond_dim))
        self.null_text_embed = nn.Parameter(torch.randn(1, max_text_len, cond_dim))

        # ---------------------------------------------------------------- network
        dims = [init_dim] + [dim * m for m in dim_mults]
        in_out = list(zip(dims[:-1], dims[1:]))
        build = LevelBuilder.for_unet(self._config, time_cond_dim=time_cond_dim, cond_dim=cond_dim, release=release)
        groups_per_level = build.resnet_groups
        self.init_resnet_block = build.resnet(init_dim, init_dim, groups_per_level[0]) if memory_efficient else None
        self.downs = nn.ModuleList(
            build.down_level(level, d_in, d_out, is_last=level == levels - 1)
            for level, (d_in, d_out) in enumerate(in_out)
        )
        mid_dim = dims[-1]
        self.mid_block1 = build.resnet(mid_dim, mid_dim, groups_per_level[-1], cond_dim)
        self.mid_attn = build.self_attention(mid_dim) if (attend_at_middle or not respect_attend_at_middle) else None
        self.mid_block2 = build.resnet(mid_dim, mid_dim, groups_per_level[-1], cond_dim)
        self.ups = nn.ModuleList(
            build.up_level(level, *in_out[level], skip=build.width(*in_out[level])) for level in reversed(range(levels))
        )

        up_dims = [in_out[level][1] for level in reversed(range(levels))]
        self.upsample_combiner = UpsampleCombiner(
            dim, enabled=combine_upsample_fmaps, dim_ins=up_dims, dim_outs=[dim] * levels
        )
        self.final_resnet_block = build.resnet(self.upsample_combiner.dim_out + dim, dim, groups_per_level[0])
        self.to_out = nn.Conv2d(
            dim + (channels if self.final_lowres_input else 0),
            self.channels_out,
            final_conv_kernel_size,
            padding=final_conv_kernel_size // 2,
        )
        # Zero output at init: the first prediction is 0 (the mean of eps / v), which keeps early steps stable.
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)
        if release.layer_norm_divides_by_max:
            for module in self.modules():
                if isinstance(module, (LayerNorm, ChanLayerNorm)):
                    module.divide_by_max = True

    def lowres_input(
        self, image: torch.Tensor, size: int, clamp_range: Optional[Tuple[float, float]] = None
    ) -> torch.Tensor:
        """The previous stage's images resized to this upsampler's input: nearest-neighbour, or cubic
        for U-Nets of releases before 0.23.10 (`reference_release`); clamped to clamp_range (not
        before 0.16.16)."""
        if self.unclamped_lowres_input:
            clamp_range = None
        if not self.cubic_lowres_input or image.shape[-1] == size:
            return resize_image(image, size, clamp_range)
        out = resize_cubic(image, size)
        return out if clamp_range is None else out.clamp(*clamp_range)

    # -------------------------------------------------------------------- construction helpers
    @property
    def config(self) -> Dict[str, Any]:
        """The constructor arguments of this U-Net."""
        return dict(self._config)

    def with_settings(self, **overrides: Any) -> "Unet":
        """This U-Net if it already has these settings, else a fresh one built with them."""
        unknown = set(overrides) - set(self._config)
        if unknown:
            raise TypeError(f"Unet.with_settings: unknown options {sorted(unknown)}")
        # Effective values: channels_out=None means `channels`, as the reference's cast compares it.
        current = {**self._config, "channels_out": self.channels_out}
        changed = {k: v for k, v in overrides.items() if current[k] != v}
        if not changed:
            return self
        return Unet(**{**self._config, **changed})

    def cast_model_parameters(
        self,
        *,
        lowres_cond: bool,
        lowres_noise_cond: bool,
        channels: int,
        channels_out: int,
        cond_on_image_embeds: bool,
        cond_on_text_encodings: bool,
    ) -> "Unet":
        """The reference's name for `with_settings` with the six settings a Decoder imposes."""
        return self.with_settings(
            lowres_cond=lowres_cond,
            lowres_noise_cond=lowres_noise_cond,
            channels=channels,
            channels_out=channels_out,
            cond_on_image_embeds=cond_on_image_embeds,
            cond_on_text_encodings=cond_on_text_encodings,
        )

    # -------------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        time: torch.Tensor,
        *,
        image_embed: Optional[torch.Tensor] = None,
        lowres_cond_img: Optional[torch.Tensor] = None,
        lowres_noise_level: Optional[torch.Tensor] = None,
        text_encodings: Optional[torch.Tensor] = None,
        image_cond_drop_prob: float = 0.0,
        text_cond_drop_prob: float = 0.0,
        blur_sigma: Any = None,
        blur_kernel_size: Any = None,
        disable_checkpoint: bool = False,
        self_cond: Optional[torch.Tensor] = None,
        text_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Predict the network target for noisy images x (B, C, H, W) at timesteps time (B,).

        Conditioning of each sample is replaced by the null embeddings with the given drop
        probabilities. Text positions whose encoding is all zeros count as padding (the
        reference's rule); `text_mask` (B, N) (ours) gives the valid positions explicitly instead.
        `blur_sigma` and `blur_kernel_size` are accepted and unused, as in the reference.
        """
        del blur_sigma, blur_kernel_size
        b = x.shape[0]
        image_keep = keep_mask(b, image_cond_drop_prob, x.device)
        text_keep = keep_mask(b, text_cond_drop_prob, x.device)
        return self._forward(
            x,
            time,
            image_embed,
            lowres_cond_img,
            lowres_noise_level,
            text_encodings,
            text_mask,
            self_cond,
            image_keep,
            text_keep,
            disable_checkpoint,
        )

    def _forward(
        self,
        x: torch.Tensor,
        time: torch.Tensor,
        image_embed: Optional[torch.Tensor],
        lowres_cond_img: Optional[torch.Tensor],
        lowres_noise_level: Optional[torch.Tensor],
        text_encodings: Optional[torch.Tensor],
        text_mask: Optional[torch.Tensor],
        self_cond: Optional[torch.Tensor],
        image_keep: torch.Tensor,
        text_keep: torch.Tensor,
        disable_checkpoint: bool,
    ) -> torch.Tensor:
        """forward() with the per-sample keep masks (bool (B,)) of the image and text conditioning given."""
        height, width = x.shape[-2:]
        memory_efficient = self._config["memory_efficient"]
        raise_problems(
            "Unet",
            image_size_problems("image height", height, self._config["dim_mults"], memory_efficient)
            + image_size_problems("image width", width, self._config["dim_mults"], memory_efficient),
        )
        h, lowres_cond_img = self._input_layer(x, self_cond, lowres_cond_img)
        conditioning = condition(
            self, time, h.dtype, lowres_noise_level, image_embed, image_keep, text_encodings, text_mask, text_keep
        )
        h = self._levels(h, conditioning, self._runner(disable_checkpoint))
        if self.final_lowres_input:
            h = torch.cat((h, lowres_cond_img), dim=1)
        return self.to_out(h)

    def _input_layer(
        self, x: torch.Tensor, self_cond: Optional[torch.Tensor], lowres_cond_img: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The first layer's features of x with the self-conditioning and low-res inputs, and that low-res input."""
        inputs = [x]
        if self.self_cond:
            inputs.append(torch.zeros_like(x) if self_cond is None else self_cond.to(x.dtype))
        if self.lowres_cond:
            if lowres_cond_img is None:
                raise ValueError("Unet: lowres_cond_img is required (this U-Net is an upsampler: lowres_cond)")
            lowres_cond_img = lowres_cond_img.to(x.dtype)
            inputs.append(lowres_cond_img)
        elif lowres_cond_img is not None:
            raise ValueError("Unet: lowres_cond_img given to a U-Net built without lowres_cond")
        return self.init_conv(torch.cat(inputs, dim=1) if len(inputs) > 1 else x), lowres_cond_img

    def _levels(self, first: torch.Tensor, cond: Conditioning, run: Callable[..., torch.Tensor]) -> torch.Tensor:
        """Down the levels, through the bottleneck, up again with the skip connections, and the final block."""
        t, c, mid_c = cond
        h = first
        if self.init_resnet_block is not None:
            h = run(self.init_resnet_block, h, t)

        skips: List[torch.Tensor] = []
        for pre, first_block, blocks, attn, post in self.downs:
            if pre is not None:
                h = pre(h)
            h = run(first_block, h, t, c)
            for block in blocks:
                h = run(block, h, t, c)
                skips.append(h)
            h = attn(h)
            skips.append(h)
            h = post(h)

        h = run(self.mid_block1, h, t, mid_c)
        if self.mid_attn is not None:
            h = run(self.mid_attn, h)
        h = run(self.mid_block2, h, t, mid_c)

        def with_skip(fmap: torch.Tensor) -> torch.Tensor:
            return torch.cat((fmap, skips.pop() * self.skip_connect_scale), dim=1)

        up_fmaps: List[torch.Tensor] = []
        for first_block, blocks, attn, upsample in self.ups:
            h = run(first_block, with_skip(h), t, c)
            for block in blocks:
                h = run(block, with_skip(h), t, c)
            h = attn(h)
            up_fmaps.append(h)
            h = upsample(h)

        h = self.upsample_combiner(h, up_fmaps)
        return run(self.final_resnet_block, torch.cat((h, first), dim=1), t)

    def _runner(self, disable_checkpoint: bool) -> Callable[..., torch.Tensor]:
        checkpointed = self.checkpoint_during_training and self.training and not disable_checkpoint
        return block_runner(checkpointed and torch.is_grad_enabled())

    def forward_with_cond_scale(
        self,
        x: torch.Tensor,
        time: torch.Tensor,
        *,
        cond_scale: float = 1.0,
        guide_learned_variance: bool = True,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Classifier-free guidance (Ho & Salimans 2022): null + cond_scale * (cond - null).

        The conditional and the null prediction (image and text dropped) run as one doubled batch,
        which computes per sample what two passes compute. All output channels are guided, as in
        the reference; with guide_learned_variance=False (ours) the channels past `channels` (the
        learned-variance outputs) are taken from the conditional prediction instead.
        """
        if cond_scale == 1:
            return self.forward(x, time, **kwargs)
        for name in ("image_cond_drop_prob", "text_cond_drop_prob"):
            if kwargs.get(name, 0.0) != 0.0:
                raise ValueError(f"Unet.forward_with_cond_scale: {name} cannot be combined with guidance")
            kwargs.pop(name, None)
        b = x.shape[0]

        def twice(value: Any) -> Any:
            return torch.cat([value, value], dim=0) if isinstance(value, torch.Tensor) else value

        doubled = {k: twice(kwargs.pop(k, None)) for k in _FORWARD_INPUTS}
        disable_checkpoint = bool(kwargs.pop("disable_checkpoint", False))
        for name in ("blur_sigma", "blur_kernel_size"):
            kwargs.pop(name, None)
        if kwargs:
            raise TypeError(f"Unet.forward_with_cond_scale: unexpected arguments {sorted(kwargs)}")
        keep = torch.arange(2 * b, device=x.device) < b
        out = self._forward(
            twice(x), twice(time), **doubled, image_keep=keep, text_keep=keep, disable_checkpoint=disable_checkpoint
        )
        cond, null = out.chunk(2, dim=0)
        guided = null + (cond - null) * cond_scale
        if not guide_learned_variance:
            guided = torch.cat([guided[:, : self.channels], cond[:, self.channels :]], dim=1)
        return guided


# The tensor inputs of Unet._forward besides x and time, in its argument order.
_FORWARD_INPUTS = ("image_embed", "lowres_cond_img", "lowres_noise_level", "text_encodings", "text_mask", "self_cond")
