"""The hard bounds of import parsing, in one place: what a hostile file may cost, and no more.

Every reader is bounded in memory and CPU by the file's size and these limits, whatever the file
holds (issue 15). ``ParseLimits`` carries the settings the readers need (``from_settings``);
``LongNumber`` stands for a number too long to be read as one, so that it fails its cell, naming
the column, instead of reaching ``int()`` (which refuses more than 4,300 digits, and whose C
callers in some parsers crash the process on that refusal); ``capped`` keeps messages that end up
in a task (and every poll of it) small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A number written with more characters than this is not read as a number: no 64-bit integer or
# double needs more than a few dozen, and int() of thousands of digits is slow (and refused past
# 4,300 digits).
MAX_NUMBER_CHARS = 1000

# A message stored in a task (error_message, an event) is cut after this many characters.
MAX_MESSAGE_CHARS = 4000


@dataclass(frozen=True, slots=True)
class ParseLimits:
    """The parser bounds beyond the cell size (``max_cell_bytes``), with the settings' defaults."""

    max_nesting: int = 8
    xlsx_max_inflated_bytes: int = 2 * 1024**3
    xlsx_max_shared_strings_bytes: int = 48 * 1024 * 1024
    xlsx_max_shared_strings: int = 1_000_000
    xlsx_max_ratio: int = 200

    @classmethod
    def from_settings(cls, settings: Any) -> ParseLimits:
        return cls(
            max_nesting=settings.import_max_nesting,
            xlsx_max_inflated_bytes=settings.import_xlsx_max_inflated_bytes,
            xlsx_max_shared_strings_bytes=settings.import_xlsx_max_shared_strings_bytes,
            xlsx_max_shared_strings=settings.import_xlsx_max_shared_strings,
            xlsx_max_ratio=settings.import_xlsx_max_ratio,
        )


@dataclass(frozen=True, slots=True)
class LongNumber:
    """A number cell whose text is longer than ``MAX_NUMBER_CHARS``: kept as text, never converted.
    No column type takes it; ``formats.converters`` says what it is."""

    text: str

    def __str__(self) -> str:  # how an error report's "original" shows it (json_text's fallback)
        return f"{self.text[:20]}…({len(self.text):,} characters)"

    def describe(self) -> str:
        return f"a number of {len(self.text):,} characters (too long to read; at most {MAX_NUMBER_CHARS:,})"


def number_or_long(text: str) -> Any:
    """A JSON or XLSX number's text as ``int`` (no fraction or exponent) or ``float``, or a
    ``LongNumber`` when it is too long to convert safely."""
    if len(text) > MAX_NUMBER_CHARS:
        return LongNumber(text)
    if "." in text or "e" in text or "E" in text:
        return float(text)  # 1e400 is inf, which a float column refuses
    return int(text)


def capped(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` cut after ``limit`` characters, saying how much was left out."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}… and {len(message) - limit:,} more characters"


def listed(items: list[str], shown: int = 20) -> str:
    """The first ``shown`` items, comma-separated, then "and N more"."""
    text = ", ".join(items[:shown])
    return text + (f" and {len(items) - shown:,} more" if len(items) > shown else "")
