"""The source seam: what a dataset is, and the one interface every data store implements."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from sources.query import Query

# Column types a dataset may declare. Readers and writers convert by these names.
COLUMN_TYPES = ("string", "integer", "float", "boolean", "date", "datetime")
NUMERIC_TYPES = ("integer", "float")
# What a document's value decoded as JSON must be to be its column's cell as it is (msgspec types a
# decoding with these; a JSON integer decoded as a float is the float cell the sources make of it).
# Dates and date-times are text that still has to be checked.
DECODED_CELL_TYPES = {"string": str | None, "integer": int | None, "float": float | None, "boolean": bool | None}

Row = tuple[Any, ...]


@dataclass(frozen=True)
class Column:
    name: str
    type: str = "string"
    filterable: bool = True
    sortable: bool = True
    required: bool = False
    max_length: int | None = None


@dataclass(frozen=True)
class Scope:
    """Rows of a dataset belong to a tenant: a caller reads and writes only the rows whose ``column``
    equals their token's ``claim`` (a dotted path into the verified claims)."""

    column: str
    claim: str


@dataclass(frozen=True)
class Dataset:
    name: str
    source: str  # sqlite | postgres | opensearch
    url: str
    table: str
    columns: tuple[Column, ...]
    title: str | None = None
    key: tuple[str, ...] = ()
    importable: bool = False
    max_export_rows: int = 80_000
    stream_max_rows: int = 10_000
    # Every finished export or import of this dataset emails its owner, asked or not.
    notify: bool = False
    # Who may read (export) and write (import) it: "*" (everyone signed in), "role:NAME" or
    # "user:ID". ``importers`` of None means the readers when importable, else nobody.
    readers: tuple[str, ...] = ("*",)
    importers: tuple[str, ...] | None = None
    scope: Scope | None = None
    by_name: dict[str, Column] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {c.name: c for c in self.columns})

    def column(self, name: str) -> Column | None:
        return self.by_name.get(name)


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


class SourceError(Exception):
    """A read failed in a way the user can act on (bad data, missing table). Not retried."""


class TransientSourceError(SourceError):
    """A read failed for a reason that may pass (locked, unreachable). Retried by the worker."""


class Source(Protocol):
    """Reads one dataset. Implementations are small classes beside this file."""

    dataset: Dataset

    async def count(self, query: Query, cap: int | None = None) -> int:
        """Rows matching ``query`` (ignoring its limit), counting no further than ``cap``."""
        ...

    async def counted(self, query: Query, rows: int) -> None:
        """``rows`` is the count of ``query``, made by the caller earlier (the api counts when an
        export is requested): a source that plans its read by the count takes this one."""
        ...

    def batches(self, query: Query, batch_rows: int) -> AsyncGenerator[list[Row], None]:
        """Matching rows in a stable order, as tuples in ``query.columns`` order, typed per column.

        An async generator: a caller that stops early closes it (``contextlib.aclosing``), and the
        source releases its cursor or scroll right then."""
        ...

    async def close(self) -> None: ...
