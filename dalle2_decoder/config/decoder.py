"""`decoder`: the U-Nets of the cascade and the diffusion settings of the Decoder.

The reference lets any U-Net or Decoder constructor parameter be given in the config. Here the
documented options are typed fields; every other key is kept in `options` after being checked
against the constructor's signature (see `dalle2_decoder.config.structure`), so a misspelled key
is still an error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

import attrs

from ..models.cascade_rules import LOSS_TYPES as LOSS_TYPES
from ..models.cascade_rules import (
    augmentation_problems,
    image_sizes_problems,
    loss_type_problems,
    sample_steps_problems,
    sampler_problems,
)
from ..models.decoder import Decoder
from ..models.samplers import SAMPLER_NAMES
from ..models.schedules import BETA_SCHEDULES as SCHEDULE_FUNCTIONS
from ..models.schedules import beta_schedules_problems
from ..models.unet import Unet
from .checks import at_least, in_range, one_of, one_per_unet

if TYPE_CHECKING:
    from .root import TrainDecoderConfig

CLIP_MAKES = ("openai", "open_clip")
# The names the models define, under the names the config's users know (`choices`, `--help`).
BETA_SCHEDULES = tuple(SCHEDULE_FUNCTIONS)
SAMPLERS = SAMPLER_NAMES


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

    def check(self, path: str) -> List[str]:
        return one_of(f"{path}.make", self.make, CLIP_MAKES)


@attrs.frozen
class UnetConfig:
    """One U-Net of the cascade; any other `Unet` constructor parameter may be given as well."""

    dim: int
    """Channels of the first resolution level."""
    image_embed_dim: Optional[int] = None
    """Dimension of the CLIP image embeddings; required for U-Net 1 unless the decoder is unconditional."""
    dim_mults: Tuple[int, ...] = (1, 2, 4, 8)
    """Channel multiplier of each resolution level."""
    options: Dict[str, Any] = attrs.field(factory=dict)
    """Further `Unet` constructor parameters, by name (checked against its signature)."""

    def check(self, path: str) -> List[str]:
        problems = at_least(f"{path}.dim", self.dim, 1) + at_least(f"{path}.image_embed_dim", self.image_embed_dim, 1)
        if not self.dim_mults:
            problems.append(f"{path}.dim_mults: needs at least one resolution level")
        if any(mult < 1 for mult in self.dim_mults):
            problems.append(f"{path}.dim_mults: every multiplier must be at least 1 (got {list(self.dim_mults)})")
        return problems

    @property
    def conditions_on_text(self) -> bool:
        """Whether this U-Net is given text encodings (`cond_on_text_encodings`)."""
        return bool(self.options.get("cond_on_text_encodings", False))

    def create(self) -> Unet:
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
    samplers: Union[None, str, List[Optional[str]]] = None
    """Sampler, one or one per U-Net: ddpm, ddim, dpmpp_2m, dpmpp_2m_karras, unipc or unipc_karras, making
    `sample_timesteps` network calls (all `timesteps` when null); null keeps the reference's DDPM, or DDIM where
    `sample_timesteps` is set."""
    loss_type: str = "l2"
    """Loss: `l1`, `l2` or `huber`."""
    beta_schedule: Union[None, str, List[str]] = "cosine"
    """Noise schedule, one or one per U-Net: cosine, linear, quadratic, jsd or sigmoid. The default is cosine for
    every U-Net (the documented default); an explicit null means DALLE2-pytorch's rule when its config leaves the
    option out: cosine, and linear for the last U-Net of a cascade."""
    learned_variance: Union[bool, List[bool]] = True
    """Learn the reverse-process variance (hybrid loss); one value or a list, padded with false to one per U-Net,
    so `true` means the first U-Net only (as DALLE2-pytorch)."""
    image_cond_drop_prob: float = 0.1
    """Probability of dropping the image embedding in training (classifier-free guidance)."""
    text_cond_drop_prob: float = 0.5
    """Probability of dropping the text encodings in training (classifier-free guidance)."""
    options: Dict[str, Any] = attrs.field(factory=dict)
    """Further `Decoder` constructor parameters, by name (checked against its signature)."""

    def check(self, root: "TrainDecoderConfig") -> List[str]:
        """Problems within the decoder section (the U-Nets, sizes and per-U-Net lists agree)."""
        problems: List[str] = []
        num_unets = len(self.unets)
        if num_unets == 0:
            problems.append("decoder.unets: needs at least one U-Net")
        for index, unet in enumerate(self.unets):
            problems += unet.check(f"decoder.unets[{index}]")
        problems += image_sizes_problems("decoder.image_sizes", self.image_sizes, num_unets, "decoder.unets")
        for index, size in enumerate(self.image_sizes):
            problems += at_least(f"decoder.image_sizes[{index}]", size, 1)
        if self.clip is not None:
            problems += self.clip.check("decoder.clip")
        problems += at_least("decoder.channels", self.channels, 1)
        problems += at_least("decoder.timesteps", self.timesteps, 1)
        problems += loss_type_problems("decoder.loss_type", self.loss_type)
        problems += in_range("decoder.image_cond_drop_prob", self.image_cond_drop_prob, 0.0, 1.0)
        problems += in_range("decoder.text_cond_drop_prob", self.text_cond_drop_prob, 0.0, 1.0)
        problems += self._image_embed_problems()
        for name in ("beta_schedule", "sample_timesteps", "samplers"):
            problems += one_per_unet(f"decoder.{name}", getattr(self, name), num_unets)
        if isinstance(self.learned_variance, list) and len(self.learned_variance) > num_unets:
            problems.append(
                f"decoder.learned_variance: has {len(self.learned_variance)} entries but decoder.unets has "
                f"{num_unets} U-Net{'s' if num_unets != 1 else ''}; a shorter list is padded with false"
            )
        problems += augmentation_problems(
            "decoder",
            self.options.get("use_noise_for_lowres_cond", False),
            self.options.get("use_blur_for_lowres_cond", True),
            num_unets,
        )
        problems += beta_schedules_problems(
            "decoder.beta_schedule", self.beta_schedule, num_unets, self.timesteps, "decoder.timesteps"
        )
        problems += sampler_problems("decoder.samplers", self.samplers)
        problems += sample_steps_problems(
            "decoder.sample_timesteps", self.sample_timesteps, num_unets, self.timesteps, "decoder.timesteps"
        )
        return problems

    def _image_embed_problems(self) -> List[str]:
        """The U-Nets conditioned on the image embedding (the first, or all with image_embed_all_unets) need
        its width."""
        if self.options.get("unconditional", False):
            return []
        everywhere = bool(self.options.get("image_embed_all_unets", False))
        return [
            f"decoder.unets[{index}].image_embed_dim: required option missing"
            for index, unet in enumerate(self.unets)
            if unet.image_embed_dim is None and (index == 0 or everywhere)
        ]

    def notes(self, root: "TrainDecoderConfig") -> List[str]:
        """Options that are accepted but have no effect."""
        notes = []
        if self.image_size is not None:
            notes.append(
                "decoder.image_size: accepted for compatibility and ignored; decoder.image_sizes sets the "
                "resolution of each U-Net"
            )
        return notes

    @property
    def conditions_on_text(self) -> bool:
        """Whether any U-Net is given text encodings."""
        return any(unet.conditions_on_text for unet in self.unets)

    def create(self) -> Decoder:
        unets = [unet.create() for unet in self.unets]
        return Decoder(
            unets,
            image_sizes=list(self.image_sizes),
            channels=self.channels,
            timesteps=self.timesteps,
            sample_timesteps=self.sample_timesteps,
            samplers=self.samplers,
            loss_type=self.loss_type,
            beta_schedule=self.beta_schedule,
            learned_variance=self.learned_variance,
            image_cond_drop_prob=self.image_cond_drop_prob,
            text_cond_drop_prob=self.text_cond_drop_prob,
            **self.options,
        )
