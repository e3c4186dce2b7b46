"""A decoder assembled from U-Nets of different files (dalle2-laion's `unet_sources`).

LAION trained the base U-Net and the upsamplers of its decoders in separate runs and combined
them for sampling. Here each slot of a cascade config takes the U-Net of one file: a model save
or checkpoint of this package, or a DALLE2-pytorch checkpoint or model save of any supported
release (checkpoints give their EMA weights unless `use_ema=False`). Before anything is
combined, each part is checked against its slot: input channels (an upsampler also takes the
low-resolution image), output channels (learned variance), image-embedding and text
conditioning, widths, and the image size the part was trained at where its file records it; a
part that does not fit is refused in one line naming the slot, the file and what differs.

A part written by an earlier DALLE2-pytorch release keeps that release's U-Net: its slot is
built with `reference_release` (see `models.releases`), and the assembled config records it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .checkpoint import CheckpointError, LoadedCheckpoint, checkpoint_weights
from .reference import release_differs

_PART = re.compile(r"^(\d+)=(.+?)(?::(\d+))?$")


@dataclass(frozen=True)
class UnetPart:
    """U-Net `file_unet` of `loaded` fills slot `slot` (both numbered from 1)."""

    slot: int
    loaded: LoadedCheckpoint
    file_unet: Optional[int] = None
    """Which U-Net of the file; None: the slot's number when the file has it, else its only U-Net."""


def parse_part(text: str) -> Tuple[int, str, Optional[int]]:
    """`2=upsampler.pth` or `2=cascade.pth:2` -> (slot, path, U-Net of the file or None)."""
    match = _PART.match(text.strip())
    if match is None or int(match.group(1)) < 1:
        raise ValueError(
            f"--unet {text!r}: expected SLOT=FILE or SLOT=FILE:UNET (e.g. 1=base.pth, 2=cascade.pth:2), slots from 1"
        )
    slot, path, file_unet = match.groups()
    return int(slot), path, None if file_unet is None else int(file_unet)


def _unet_numbers(weights: Mapping[str, torch.Tensor]) -> List[int]:
    return sorted({int(name.split(".")[1]) + 1 for name in weights if re.match(r"^unets\.\d+\.", name)})


def _weights(loaded: LoadedCheckpoint, use_ema: bool) -> Dict[str, torch.Tensor]:
    if loaded.kind == "model":
        return dict(loaded.model_state or {})
    return checkpoint_weights(loaded, use_ema=use_ema)


def _recorded(loaded: LoadedCheckpoint) -> Optional[Dict[str, Any]]:
    from .reference import recorded_config

    try:
        raw = recorded_config(loaded)
    except ValueError:
        return None
    return raw if isinstance(raw, dict) and isinstance(raw.get("decoder"), dict) else None


def _part_release(loaded: LoadedCheckpoint, recorded: Optional[Dict[str, Any]], number: int) -> Optional[str]:
    """The release whose U-Net the part is: the file's, or what its recorded config gives that U-Net."""
    if loaded.reference_release is not None:
        return loaded.reference_release
    unets = (recorded or {}).get("decoder", {}).get("unets") or []
    if 0 < number <= len(unets) and isinstance(unets[number - 1], dict):
        return unets[number - 1].get("reference_release")
    return None


def _slot_release(unet: Any) -> Optional[str]:
    return unet.options.get("reference_release") if hasattr(unet, "options") else None


def _describe_misfit(
    expected: Mapping[str, torch.Tensor], part: Mapping[str, torch.Tensor], slot: int, where: str
) -> Optional[str]:
    """The first way the part's weights do not fit the slot's U-Net, in words; None when they fit."""
    missing = [name for name in expected if name not in part]
    extra = [name for name in part if name not in expected]
    shapes = [name for name in expected if name in part and part[name].shape != expected[name].shape]

    def shape(tensors, name):
        return tuple(tensors[name].shape)

    if "init_conv.convs.0.weight" in shapes or "init_conv.weight" in shapes:
        key = "init_conv.convs.0.weight" if "init_conv.convs.0.weight" in shapes else "init_conv.weight"
        got, want = shape(part, key)[1], shape(expected, key)[1]
        kind = "an upsampler's (image + low-res image)" if want > got else "a base U-Net's"
        return (
            f"U-Net slot {slot}: {where} takes {got} input channels, the slot {want}, {kind} input; a base "
            "U-Net cannot fill an upsampler slot, nor an upsampler a base slot"
        )
    if "to_out.weight" in shapes and shape(part, "to_out.weight")[0] != shape(expected, "to_out.weight")[0]:
        got, want = shape(part, "to_out.weight")[0], shape(expected, "to_out.weight")[0]
        return (
            f"U-Net slot {slot}: {where} outputs {got} channels, the slot {want} (decoder.learned_variance differs "
            "for this U-Net, or the image channels)"
        )
    if "to_out.weight" in shapes:
        got, want = shape(part, "to_out.weight")[1], shape(expected, "to_out.weight")[1]
        return (
            f"U-Net slot {slot}: {where} takes {got} channels into its output convolution, the slot {want} "
            "(upsamplers of DALLE2-pytorch before 0.24 do not take the low-res image there: the slot's "
            "reference_release must be the file's release)"
        )
    for prefix, what in (
        ("to_image_hiddens", "image-embedding width (image_embed_dim) or conditioning on it"),
        ("image_to_tokens", "image-embedding width (image_embed_dim) or image tokens"),
        ("text_to_cond", "text conditioning (cond_on_text_encodings, text_embed_dim)"),
        ("null_text_embed", "text conditioning (max_text_len, cond_dim)"),
        ("to_lowres_noise_cond", "low-res noise conditioning (use_noise_for_lowres_cond)"),
    ):
        names = [n for n in missing + extra + shapes if n.startswith(prefix)]
        if names:
            return f"U-Net slot {slot}: {where} differs from the slot in its {what} ({names[0]})"
    differing = shapes + missing + extra
    if not differing:
        return None
    first = differing[0]
    detail = (
        f"{first} {shape(part, first)} vs {shape(expected, first)}"
        if first in shapes
        else f"{first} {'missing from the file' if first in missing else 'not in the slot'}"
    )
    return (
        f"U-Net slot {slot}: {where} has another architecture than the slot's config (dim, dim_mults, "
        f"attention, num_resnet_blocks...): {len(differing)} tensors differ, first {detail}"
    )


def _by_slot(parts: Sequence[UnetPart], slots: int) -> Dict[int, UnetPart]:
    """The parts by slot, exactly one for each of the cascade's `slots` U-Nets."""
    by_slot: Dict[int, UnetPart] = {}
    for part in parts:
        if not 1 <= part.slot <= slots:
            raise CheckpointError(f"U-Net slot {part.slot}: the cascade config has U-Nets 1 to {slots}")
        if part.slot in by_slot:
            raise CheckpointError(
                f"U-Net slot {part.slot}: given twice ({by_slot[part.slot].loaded.source}, {part.loaded.source})"
            )
        by_slot[part.slot] = part
    absent = [n for n in range(1, slots + 1) if n not in by_slot]
    if absent:
        raise CheckpointError(f"U-Net slot(s) {', '.join(map(str, absent))}: no file given (one --unet per U-Net)")
    return by_slot


def assemble(config, parts: Sequence[UnetPart], *, use_ema: bool = True, slots_built_as_configured: bool = False):
    """(TrainDecoderConfig with each slot built as its part's release, decoder weights) from parts.

    `config` is the cascade's `TrainDecoderConfig`; every slot needs exactly one part. A slot whose
    config names no `reference_release` takes its part's; with `slots_built_as_configured` (a run
    whose decoder is already built from `config`) a part of another release is refused instead.
    Raises CheckpointError with one line naming the slot, the file and the misfit.
    """
    import attrs

    from ..models.releases import describe

    by_slot = _by_slot(parts, len(config.decoder.unets))
    unet_configs = list(config.decoder.unets)
    chosen: Dict[int, Tuple[Dict[str, torch.Tensor], str]] = {}
    releases: Dict[int, Optional[str]] = {}
    for slot, part in sorted(by_slot.items()):
        loaded = part.loaded
        weights = _weights(loaded, use_ema)
        numbers = _unet_numbers(weights)
        if part.file_unet is not None:
            number = part.file_unet
        elif slot in numbers:
            number = slot
        elif len(numbers) == 1:
            number = numbers[0]
        else:
            raise CheckpointError(
                f"U-Net slot {slot}: {loaded.source} has U-Nets {numbers}, none numbered {slot}; name one as "
                f"{slot}=FILE:N"
            )
        if number not in numbers:
            frozen = " (the run that wrote it froze it)" if loaded.partial else ""
            raise CheckpointError(f"U-Net slot {slot}: {loaded.source} has no U-Net {number}{frozen}; it has {numbers}")
        where = f"U-Net {number} of {loaded.source}"
        recorded = _recorded(loaded)
        sizes = (recorded or {}).get("decoder", {}).get("image_sizes")
        if (
            isinstance(sizes, list)
            and len(sizes) >= number
            and sizes[number - 1] != config.decoder.image_sizes[slot - 1]
        ):
            raise CheckpointError(
                f"U-Net slot {slot}: {where} was trained at {sizes[number - 1]}px, the slot samples at "
                f"{config.decoder.image_sizes[slot - 1]}px (decoder.image_sizes[{slot - 1}])"
            )
        release = _part_release(loaded, recorded, number)
        releases[slot] = release
        slot_release = _slot_release(unet_configs[slot - 1])
        if slots_built_as_configured and release is not None and describe(release) != describe(slot_release):
            raise CheckpointError(
                f"U-Net slot {slot}: {where} was written by DALLE2-pytorch {release}, whose U-Net differs from the "
                f'slot as configured: set "reference_release": "{release}" in decoder.unets[{slot - 1}] '
                "(docs/MIGRATING.md)"
            )
        if release_differs(release) and slot_release is None:
            options = {**unet_configs[slot - 1].options, "reference_release": release}
            unet_configs[slot - 1] = attrs.evolve(unet_configs[slot - 1], options=options)
        prefix = f"unets.{number - 1}."
        chosen[slot] = ({name[len(prefix) :]: t for name, t in weights.items() if name.startswith(prefix)}, where)

    config = attrs.evolve(config, decoder=attrs.evolve(config.decoder, unets=unet_configs))
    decoder = config.decoder.create()
    state: Dict[str, torch.Tensor] = {}
    for slot, (part_weights, where) in chosen.items():
        expected = decoder.unets[slot - 1].state_dict()
        problem = _describe_misfit(expected, part_weights, slot, where)
        if problem:
            if _slot_release(unet_configs[slot - 1]) is None and releases[slot] is None:
                problem += (
                    "; a DALLE2-pytorch model save written before 1.0 records no release: if the file is one, set "
                    f'"reference_release" in decoder.unets[{slot - 1}] to the release it was trained with'
                )
            raise CheckpointError(problem)
        state.update({f"unets.{slot - 1}.{name}": tensor for name, tensor in part_weights.items()})
    return config, state
