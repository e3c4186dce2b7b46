"""The one error a bad configuration raises, and the warning for accepted-but-ignored options."""

from __future__ import annotations

from typing import ClassVar, Iterable, List

from ..failures import EXIT_CONFIG


class ConfigError(ValueError):
    """A configuration with problems. `problems` holds one `path: reason` line for each of them.

    Every problem found is listed, not just the first: structural ones (unknown keys, wrong types,
    missing required options) and cross-field ones (checks between options) alike.
    """

    exit_status: ClassVar[int] = EXIT_CONFIG
    reported_verbatim: ClassVar[bool] = True  # the message is the whole report, header included

    def __init__(self, problems: Iterable[str], source: str = "configuration"):
        self.problems: List[str] = list(problems)
        self.source = source
        count = len(self.problems)
        header = f"{source}: {count} problem{'s' if count != 1 else ''}"
        super().__init__("\n".join([header, *(f"  {line}" for line in self.problems)]))


class ConfigWarning(UserWarning):
    """An option that is accepted (usually for compatibility with the reference trainer) but has no effect here."""
