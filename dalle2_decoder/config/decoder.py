"""`decoder`: the U-Nets of the cascade and the diffusion settings of the Decoder.

The reference lets any U-Net or Decoder constructor parameter be given in the config. Here the
documented options are typed fields; every other key is kept in `options` after being checked
against the constructor's signature (see `dalle2_decoder.config.structure`), so a misspelled key
is still an error.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import attrs

if TYPE_CHECKING:  # imported lazily: building a config must not need torch
    from ..models.decoder import Decoder
    from ..models.unet import Unet


@attrs.frozen
class ClipConfig:
    """CLIP model used to compute embeddings on the fly when the data has none."""

    make: str = "openai"
    """Implementation: `openai` or `open_clip`."""
    model: str = "ViT-L/14"
    """Model name within that implementation."""
    pretrained: Optional[str] = None
    """Local weights file, or the open_clip pretrained tag; None uses the implementation's default."""
    cache_dir: Optional[str] = None
    """Folder where weights are looked up (and downloaded to, where a network is available)."""


@attrs.frozen
class UnetConfig:
    """One U-Net of the cascade; any other `Unet` constructor parameter may be given as well."""

    dim: int
    """Channels of the first resolution level."""
    image_embed_dim: int
    """Dimension of the CLIP image embeddings."""
    dim_mults: Tuple[int, ...] = (1, 2, 4, 8)
    """Channel multiplier of each resolution level."""
    options: Dict[str, Any] = attrs.field(factory=dict)
    """Further `Unet` constructor parameters, by name (checked against its signature)."""

    def create(self) -> "Unet":
        from ..models.unet import Unet

        return Unet(dim=self.dim, image_embed_dim=self.image_embed_dim, dim_mults=tuple(self.dim_mults), **self.options)


@attrs.frozen
class DecoderConfig:
    """The decoder; any other `Decoder` constructor parameter may be given as well."""

    unets: List[UnetConfig]
    """The U-Nets of the cascade, lowest resolution first."""
    image_sizes: List[int]
    """Output resolution of each U-Net, increasing; one per U-Net."""
    image_size: Optional[int] = None
    """Not used (accepted for compatibility with reference configs)."""
    clip: Optional[ClipConfig] = None
    """CLIP for computing embeddings on the fly; None when the data has embeddings."""
    channels: int = 3
    """Image channels."""
    timesteps: int = 1000
    """Diffusion timesteps used in training and full-chain sampling."""
    sample_timesteps: Union[None, int, List[Optional[int]]] = None
    """DDIM sampling steps, one value or one per U-Net; None samples the full chain."""
    loss_type: str = "l2"
    """Loss: `l1`, `l2` or `huber`."""
    beta_schedule: Union[None, str, List[str]] = None
    """Noise schedule, one or per U-Net: cosine (the default, None), linear, quadratic, jsd, sigmoid."""
    learned_variance: Union[bool, List[bool]] = True
    """Learn the reverse-process variance (hybrid loss), one value or one per U-Net."""
    image_cond_drop_prob: float = 0.1
    """Probability of dropping the image embedding in training (classifier-free guidance)."""
    text_cond_drop_prob: float = 0.5
    """Probability of dropping the text encodings in training (classifier-free guidance)."""
    options: Dict[str, Any] = attrs.field(factory=dict)
    """Further `Decoder` constructor parameters, by name (checked against its signature)."""

    def create(self) -> "Decoder":
        from ..models.decoder import Decoder

        unets = [unet.create() for unet in self.unets]
        return Decoder(
            unets,
            image_sizes=list(self.image_sizes),
            channels=self.channels,
            timesteps=self.timesteps,
            sample_timesteps=self.sample_timesteps,
            loss_type=self.loss_type,
            beta_schedule=self.beta_schedule,
            learned_variance=self.learned_variance,
            image_cond_drop_prob=self.image_cond_drop_prob,
            text_cond_drop_prob=self.text_cond_drop_prob,
            **self.options,
        )
