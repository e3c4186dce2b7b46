"""Counting good and bad samples per phase, and the stop rule for too much bad data.

Counts are plain `{name: int}` dicts so they can travel from worker processes inside batches.
Invariant: `seen == ok + sum(bad reasons)`; `padded` and `dropped_for_balance` are not samples
seen (see docs/DATA.md).
"""

from __future__ import annotations

from typing import ClassVar, Dict, Iterable, Mapping, Optional

from ..failures import EXIT_DATA

BAD_REASONS = (
    "no_image",  # the sample has no jpg/jpeg/png/webp/bmp member
    "corrupt_image",  # the image bytes do not decode
    "transform_error",  # preprocessing raised on this image (e.g. smaller than a RandomCrop)
    "image_size_mismatch",  # after preprocessing, the image's size differs from the size the preprocessing gives
    # (or, when the preprocessing fixes no size, from the size most images have)
    "missing_embedding",  # no embedding for the sample, or an all-zero row (clip-retrieval's "missing")
    "corrupt_embedding",  # an embedding member that is not a readable .npy, or non-finite values
    "wrong_embedding_dim",  # an embedding whose size differs from the expected dimension
    "bad_key",  # the key does not end in index_width digits, so no embedding row can be found
    "unreadable_shard",  # the shard could not be opened: all its planned samples are lost
    "unreadable_embeddings",  # the shard's embedding file could not be read: its samples are lost
    "truncated_tar",  # the archive broke off: the planned samples after the break are lost
    "not_a_tar",  # the shard file is not a tar archive at all: all its planned samples are lost
)
"""Reasons a sample is skipped, each counted separately."""

EXTRA_COUNTS = ("padded", "dropped_for_balance", "shard_read_errors")
"""Not samples seen: repeats added to keep batch counts equal, leftovers dropped for the same
reason, and failed shard reads (their lost samples are counted under a bad reason; a shard whose
samples are split between workers counts once per worker that read it)."""

MIN_SAMPLES_BEFORE_JUDGING = 500
"""The bad fraction is judged mid-phase only after this many samples (a few bad samples at the
start of a small run are not a reason to stop); at the end of a phase it is always judged."""


class BadDataError(RuntimeError):
    """More than `data.max_bad_sample_fraction` of the samples seen in a phase were bad."""

    exit_status: ClassVar[int] = EXIT_DATA


def new_counts() -> Dict[str, int]:
    return {"seen": 0, "ok": 0, **{reason: 0 for reason in BAD_REASONS}, **{name: 0 for name in EXTRA_COUNTS}}


def bad_total(counts: Mapping[str, int]) -> int:
    return sum(counts.get(reason, 0) for reason in BAD_REASONS)


def merge_counts(parts: Iterable[Mapping[str, int]]) -> Dict[str, int]:
    """Sum of several count dicts (workers of a rank, or ranks gathered by the trainer)."""
    total = new_counts()
    for part in parts:
        for name, value in part.items():
            total[name] = total.get(name, 0) + int(value)
    return total


def format_counts(counts: Mapping[str, int]) -> str:
    """'1000 samples seen, 990 ok, 10 bad (corrupt_image 7, missing_embedding 3)' and extras."""
    bad = bad_total(counts)
    details = ", ".join(f"{r} {counts[r]}" for r in BAD_REASONS if counts.get(r))
    text = f"{counts.get('seen', 0)} samples seen, {counts.get('ok', 0)} ok, {bad} bad"
    if details:
        text += f" ({details})"
    extras = ", ".join(f"{name} {counts[name]}" for name in EXTRA_COUNTS if counts.get(name))
    return text + (f"; {extras}" if extras else "")


def check_bad_fraction(
    counts: Mapping[str, int],
    max_fraction: float,
    where: str,
    *,
    final: bool,
    first_problems: Optional[Mapping[str, str]] = None,
) -> None:
    """Raise BadDataError when the bad fraction is over the limit (mid-phase: once enough was seen).

    `first_problems`: the first bad sample of each reason with what was wrong, added to the message.
    """
    seen = counts.get("seen", 0)
    if seen == 0 or (not final and seen < MIN_SAMPLES_BEFORE_JUDGING):
        return
    bad = bad_total(counts)
    if bad > max_fraction * seen:
        raise BadDataError(
            f"{where}: {bad} of {seen} samples ({bad / seen:.1%}) are bad, more than "
            f"data.max_bad_sample_fraction={max_fraction}: {format_counts(counts)}"
            + (f"; first problems: {'; '.join(first_problems.values())}" if first_problems else "")
        )
