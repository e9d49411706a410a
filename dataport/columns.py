"""What a column and a row are: the types every reader and writer converts by, and the one text of
a date-time. Shared by ``formats/`` (which converts cells by column type) and ``sources/`` (whose
datasets are made of columns, ``sources.base``), so it sits below both, with the settings and the
errors. Importing it costs nothing: no writer, no driver."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

# Column types a dataset may declare. Readers and writers convert by these names.
COLUMN_TYPES = ("string", "integer", "float", "boolean", "date", "datetime")
NUMERIC_TYPES = ("integer", "float")

Row = tuple[Any, ...]


@dataclass(frozen=True)
class Column:
    name: str
    type: str = "string"
    filterable: bool = True
    sortable: bool = True
    required: bool = False
    max_length: int | None = None


def iso_datetime(value: dt.datetime) -> str:
    """The one text form of a date-time in every file, from every source: UTC, ISO 8601, ``Z``,
    fractions of a second only when there are any."""
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC)
    # Not strftime: it does not zero-pad years before 1000, which imports would then refuse.
    text = f"{value.year:04d}-{value.month:02d}-{value.day:02d}T{value.hour:02d}:{value.minute:02d}:{value.second:02d}"
    if value.microsecond:
        text += f".{value.microsecond:06d}".rstrip("0")
    return text + "Z"
