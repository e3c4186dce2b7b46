"""Options given once for the whole cascade or once per U-Net."""

from __future__ import annotations

from typing import List, Optional, Sequence, TypeVar, Union

T = TypeVar("T")


def per_unet(value: Union[T, Sequence[T]], count: int, *, name: Optional[str] = None) -> List[T]:
    """One value per U-Net: a single value is repeated `count` times, a list must have `count` entries.

    `name` says which option a wrong-length list came from (a ValueError naming it). Config
    loading reports wrong lengths as config problems first (`config.checks.one_per_unet`), so
    this error means a caller outside the config passed a bad list.
    """
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            what = name or "a per-U-Net option"
            raise ValueError(
                f"{what} has {len(value)} entries but there are {count} U-Nets (give one value or one per U-Net)"
            )
        return list(value)
    return [value] * count


def as_list(value: Union[T, Sequence[T]]) -> List[T]:
    """Every value an option holds: a list as it is, a single value as a list of one."""
    return list(value) if isinstance(value, (list, tuple)) else [value]
