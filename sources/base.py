"""The source seam: what a dataset is, and the one interface every data store implements."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

# A dataset is made of columns. What a column and a row are is shared with formats/, which sits
# below sources/, so it lives in dataport.columns; the source seam names it too.
from dataport.columns import COLUMN_TYPES as COLUMN_TYPES
from dataport.columns import NUMERIC_TYPES as NUMERIC_TYPES
from dataport.columns import Column as Column
from dataport.columns import Row as Row
from dataport.columns import iso_datetime as iso_datetime

if TYPE_CHECKING:
    from sources.query import Query

# What a document's value decoded as JSON must be to be its column's cell as it is (msgspec types a
# decoding with these; a JSON integer decoded as a float is the float cell the sources make of it).
# Dates and date-times are text that still has to be checked.
DECODED_CELL_TYPES = {"string": str | None, "integer": int | None, "float": float | None, "boolean": bool | None}


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
