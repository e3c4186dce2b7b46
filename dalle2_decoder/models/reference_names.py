"""Parameter names of DALLE2-pytorch state dicts (1.15.6 and earlier releases) -> ours (the one place that maps them).

Our U-Net uses the reference's module tree and names (`downs.1.2.0.cross_attn.to_kv.weight`,
...), so a U-Net's state maps one to one; what this module adds is the checking: prefixes the
reference's wrappers add are removed, and the Decoder's entries that are not network weights are
dropped with a reason that callers can report.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Tuple

import torch

# Prefixes put in front of every name by wrappers the reference (or torch) may have saved through.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_UNET_KEY = re.compile(r"^unets\.(\d+)\.(.+)$")

# Entries of the reference Decoder's state dict that are not U-Net weights, with why they are dropped.
_DROPPED_DECODER_PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("clip.", "the CLIP model is loaded from its own checkpoint, not stored with the decoder"),
    ("vaes.", "latent-diffusion VAEs are not supported here (the reference's default is an identity VAE)"),
    ("noise_schedulers.", "noise schedules are buffers recomputed from the config"),
    ("lowres_conds.", "the low-res conditioner has no weights"),
    ("lowres_cond.", "the low-res conditioner has no weights"),
)
# Module names of earlier releases that the same weights have now (old -> new). Before 1.14 the
# ResnetBlock's cross-attention sat inside einops-exts' `EinopsToAndFrom` wrapper (`.fn`).
_RENAMED = ((".cross_attn.fn.", ".cross_attn."),)
# Before 0.16 the LayerNorm's scale was `gamma` (later `g`), and it kept a `beta` buffer of zeros
# for F.layer_norm's bias: the scale is renamed, the zero shift dropped.
_OLD_LAYER_NORM_SCALE, _OLD_LAYER_NORM_SHIFT = ".gamma", ".beta"
OLD_LAYER_NORM_SHIFT_REASON = "LayerNorm shifts of DALLE2-pytorch before 0.16: buffers of zeros (F.layer_norm's bias)"
# Buffers (non-persistent in spirit) that reference versions saved; recomputed here.
_DROPPED_DECODER_NAMES = {"_dummy": "a device-tracking buffer of the reference"}


def _renamed(name: str) -> str:
    for old, new in _RENAMED:
        name = name.replace(old, new)
    if name.endswith(_OLD_LAYER_NORM_SCALE):
        name = name[: -len(_OLD_LAYER_NORM_SCALE)] + ".g"
    return name


def old_layer_norm_shift(name: str, state: Mapping[str, torch.Tensor]) -> bool:
    """Whether `name` is the zero `beta` buffer of a LayerNorm of a release before 0.16 (beside its `gamma`).

    Such a shift that is not zero would change what the network computes: a ValueError names it.
    """
    if not name.endswith(_OLD_LAYER_NORM_SHIFT):
        return False
    if name[: -len(_OLD_LAYER_NORM_SHIFT)] + _OLD_LAYER_NORM_SCALE not in state:
        return False
    if bool(torch.any(state[name] != 0)):
        raise ValueError(f"{name!r}: a LayerNorm shift (DALLE2-pytorch before 0.16) that is not zero")
    return True


def _strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def unet_state_from_reference(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our `Unet` state dict from the reference's `Unet.state_dict()` (names are shared; wrapper prefixes removed)."""
    out: Dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if old_layer_norm_shift(name, state):
            continue
        ours = _renamed(_strip_wrappers(name))
        if ours in out:
            raise ValueError(f"reference U-Net state: {name!r} and another entry both map to {ours!r}")
        out[ours] = tensor
    return out


def decoder_state_from_reference_with_dropped(
    state: Mapping[str, torch.Tensor],
) -> Tuple[Dict[str, torch.Tensor], List[Tuple[str, str]]]:
    """Our Decoder's U-Net weights (`unets.{i}.`-prefixed) from the reference Decoder's state dict.

    Returns (state, dropped) where dropped lists (name, reason) for every entry left out. An entry
    that is neither a U-Net weight nor a known non-network entry is an error naming it.
    """
    out: Dict[str, torch.Tensor] = {}
    dropped: List[Tuple[str, str]] = []
    for name, tensor in state.items():
        bare = _strip_wrappers(name)
        match = _UNET_KEY.match(bare)
        if match:
            if old_layer_norm_shift(name, state):
                dropped.append((name, OLD_LAYER_NORM_SHIFT_REASON))
                continue
            index, rest = match.groups()
            out[f"unets.{index}.{_renamed(_strip_wrappers(rest))}"] = tensor
            continue
        reason = _DROPPED_DECODER_NAMES.get(bare) or next(
            (why for prefix, why in _DROPPED_DECODER_PREFIXES if bare.startswith(prefix)), None
        )
        if reason is None:
            raise ValueError(
                f"reference decoder state: unexpected entry {name!r} (neither a U-Net weight nor a known buffer)"
            )
        dropped.append((name, reason))
    return out, dropped


def decoder_state_from_reference(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our Decoder's U-Net weights from the reference Decoder's state dict (non-network entries dropped)."""
    return decoder_state_from_reference_with_dropped(state)[0]


def decoder_state_to_reference(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The reference Decoder's U-Net entries from our Decoder's (`unets.{i}.` entries only; names shared)."""
    return {name: tensor for name, tensor in state.items() if _UNET_KEY.match(name)}
