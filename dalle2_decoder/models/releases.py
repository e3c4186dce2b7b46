"""What the U-Nets of earlier DALLE2-pytorch releases did differently (the one place that knows).

Our U-Net is 1.15.6's. Files written by earlier releases hold weights of U-Nets that differ in
layout or in function; `Unet(reference_release="1.1.0")` builds the U-Net as that release did, so
that its weights load and compute what they computed there. Every difference found between
0.15.4 and 1.15.6 (by reading each release's source and by running it, see
scripts/reference_fixtures/releases.py) is listed in `DIFFERENCES`, with the first release that no
longer had it. Renamed modules with unchanged function (`cross_attn.fn.` before 1.14, LayerNorm's
`gamma` and its zero `beta` buffer before 0.16) are mapped by `reference_names` instead.

`OLDEST` is 0.15.4, the release LAION's released 1.5B and 1B decoders were trained with (its
U-Net is 0.16.0's but for those LayerNorm names; its softmax is stabilised differently, which
changes nothing in float32). Releases before it are refused by name: their source was not compared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

Release = Tuple[int, int, int]

OLDEST: Release = (0, 15, 4)
NEWEST_KNOWN: Release = (1, 15, 6)


class UnsupportedReleaseError(ValueError):
    """A file or config names a DALLE2-pytorch release this package cannot reproduce."""


def parse_release(text: object) -> Release:
    """(major, minor, patch) of a release string or `packaging` Version ("1.1.0", "0.16.19", Version("1.0.6"))."""
    match = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if match is None:
        raise UnsupportedReleaseError(f"{text!r} is not a DALLE2-pytorch release number (like 1.1.0)")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def release_text(release: Release) -> str:
    return ".".join(map(str, release))


def check_supported(text: object) -> Release:
    """The parsed release, or UnsupportedReleaseError naming it when it is older than OLDEST."""
    release = parse_release(text)
    if release < OLDEST:
        raise UnsupportedReleaseError(
            f"DALLE2-pytorch {release_text(release)} is not supported: files of releases before "
            f"{release_text(OLDEST)} are not read (docs/MIGRATING.md lists the supported releases)"
        )
    return release


@dataclass(frozen=True)
class Difference:
    name: str
    until: Release
    """The first release that no longer has it."""
    what: str
    since: Release = OLDEST
    """The first release that has it."""

    def applies(self, release: Release) -> bool:
        return self.since <= release < self.until


DIFFERENCES: Tuple[Difference, ...] = (
    Difference(
        "layer_norm_divides_by_max",
        (0, 23, 3),
        "every LayerNorm first divides its input by the input's maximum (flipping the sign where it is negative)",
        since=(0, 16, 5),
    ),
    Difference(
        "conv_transpose_upsample",
        (0, 21, 0),
        "up levels double the resolution with a 4x4 stride-2 transposed convolution (no pixel shuffle)",
    ),
    Difference(
        "cubic_lowres_input",
        (0, 23, 10),
        "an upsampler's low-resolution input is resized with cubic interpolation at sampling (later: nearest)",
    ),
    Difference(
        "unclamped_lowres_input",
        (0, 16, 16),
        "an upsampler's resized low-resolution input is not clamped to the image range at sampling",
    ),
    Difference(
        "no_final_lowres_input",
        (0, 24, 0),
        "upsamplers do not see the low-resolution image again before their output convolution",
    ),
    Difference(
        "unmasked_text_padding",
        (0, 21, 1),
        "text encodings given without a mask are all kept (zero ones too) and their padding to max_text_len is "
        "zero tokens (later: positions whose encodings are zero, padding included, take the null text embedding)",
    ),
    Difference(
        "unnormalised_linear_attention",
        (1, 4, 0),
        "sparse attention (LinearAttention) neither l2-normalises its values nor divides keys and values by "
        "the square root of the number of positions",
    ),
    Difference(
        "self_attn_sqrt_scale",
        (1, 4, 3),
        "self-attention softmax scale dim_head^-0.5 (from 1.4.3 on the queries are scaled twice: 1 / dim_head)",
    ),
    Difference(
        "strided_conv_downsample",
        (1, 10, 0),
        "down levels halve the resolution with a 4x4 stride-2 convolution (no space-to-depth)",
    ),
)


@dataclass(frozen=True)
class UnetDifferences:
    """The differences of one release's U-Net from 1.15.6's (all false: 1.15.6's U-Net)."""

    layer_norm_divides_by_max: bool = False
    conv_transpose_upsample: bool = False
    cubic_lowres_input: bool = False
    unclamped_lowres_input: bool = False
    no_final_lowres_input: bool = False
    unmasked_text_padding: bool = False
    unnormalised_linear_attention: bool = False
    self_attn_sqrt_scale: bool = False
    strided_conv_downsample: bool = False

    def any(self) -> bool:
        return any(getattr(self, d.name) for d in DIFFERENCES)


def unet_differences(release: Optional[str]) -> UnetDifferences:
    """What release `release`'s U-Net does differently; None: none (this package's, 1.15.6's U-Net)."""
    if release is None:
        return UnetDifferences()
    parsed = check_supported(release)
    return UnetDifferences(**{d.name: d.applies(parsed) for d in DIFFERENCES})


def describe(release: Optional[str]) -> Tuple[str, ...]:
    """One phrase per difference of that release's U-Net, for notes and docs."""
    if release is None:
        return ()
    parsed = check_supported(release)
    return tuple(d.what for d in DIFFERENCES if d.applies(parsed))
