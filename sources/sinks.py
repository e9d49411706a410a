"""The write side of the sources: a ``RowSink`` per store, for imports.

The import worker opens one sink per import, hands it batches of validated rows, and ends with
``commit()`` (every row visible at once) or ``rollback()`` (nothing written, where the store can
undo). ``close()`` always follows and rolls back what was neither committed nor rolled back.

Cells arrive as the worker validated them, in ``columns`` order: None, str, int, float, bool;
dates as ``YYYY-MM-DD`` text and date-times as ``iso_datetime`` text (UTC, ``Z``). Each sink stores
them so that reading them back through the store's source gives exactly those values again.

Per store (the modules beside this one say how):

- SQLite (``sqlite_sink``): one write transaction; a crash, a cancel or a failure leaves the table
  as it was.
- PostgreSQL (``postgres_sink``): one connection, one transaction, COPY; the same guarantee.
- OpenSearch (``opensearch_sink``): no transactions. Document ids come from the key, so a re-run
  of a failed import converges on the same documents; what was written before a failure stays.

Rows are numbered in errors as they were handed to ``write`` (1 = the first row of the first batch).

A sink may also take rows as text, column by column: ``write_text(columns, count)`` (the
``TextRowSink`` protocol; the worker looks for the method). That is for stores that parse text
anyway (PostgreSQL's COPY), so that a CSV import never makes typed values only to print them
again. The cells are what ``formats.cells.ColumnChecker`` gives for ``TEXT``: ``""`` is no value
(None; there is no empty text, as in CSV), integers are decimal, booleans ``t``/``f``, dates,
date-times and text as in typed rows, and floats either their ``repr`` or a plain decimal that
``float()`` reads as the value (``PLAIN_FLOAT_TEXT``: ``1.50``, ``2e-3``; bounded, so that it
neither overflows nor underflows): a sink that does not read such text exactly as ``float()`` does
makes it ``repr(float(text))``. All but text is ASCII. What is stored must be what ``write``
stores for the typed rows (``rows_from_text``), errors included; rows count on across both methods.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Protocol

from sources.base import Column, Dataset, Row

if TYPE_CHECKING:
    from sources.receipts import Receipt

MODES = ("INSERT", "UPSERT")


class SinkError(Exception):
    """A write failed. The message names the dataset and, where known, the row, column and value.
    ``transient`` is true when a retry of the whole import may succeed (connection lost, locked,
    overloaded); ``row`` is the failing row's number among the rows handed to ``write`` (1-based),
    when the store said which row it was."""

    def __init__(self, message: str, *, transient: bool = False, row: int | None = None):
        super().__init__(message)
        self.transient = transient
        self.row = row


class DuplicateKeyError(SinkError):
    """INSERT mode met a row whose key already exists (in the dataset, or earlier in the same import)."""


class RowSink(Protocol):
    async def write(self, rows: list[Row]) -> None:
        """One batch of rows, tuples in ``columns`` order. Not visible to readers before ``commit``
        (SQL stores)."""
        ...

    async def commit(self, receipt: Receipt | None = None) -> int:
        """Make every written row visible at once; the number of rows handed to ``write``. SQL
        stores commit ``receipt`` with the rows (``sources/receipts.py``)."""
        ...

    async def rollback(self) -> None:
        """Drop everything written so far, where the store can. Idempotent; never raises for a
        failed or lost connection (a cancellation still propagates)."""
        ...

    async def close(self) -> None:
        """Release the connection; rolls back if neither ``commit`` nor ``rollback`` happened."""
        ...


class TextRowSink(RowSink, Protocol):
    async def write_text(self, columns: Sequence[Sequence[str]], count: int) -> None:
        """One batch of ``count`` rows given as text, one sequence of cells per column (in
        ``columns`` order); see the module docstring."""
        ...


_TEXT_BOOL = {"t": True, "f": False}


def rows_from_text(columns: Sequence[Column], cells: Sequence[Sequence[str]]) -> list[Row]:
    """The typed rows that ``cells`` (``write_text``'s columns) stand for."""
    typed: list[Sequence[Any]] = []
    for column, texts in zip(columns, cells, strict=True):
        kind = column.type
        if kind == "integer":
            typed.append([int(v) if v else None for v in texts])
        elif kind == "float":
            typed.append([float(v) if v else None for v in texts])
        elif kind == "boolean":
            typed.append([_TEXT_BOOL.get(v) for v in texts])
        else:
            typed.append([v or None for v in texts])
    return list(zip(*typed, strict=True))


async def open_sink(dataset: Dataset, columns: Sequence[Column], mode: str, settings: Any) -> RowSink:
    """A sink writing ``columns`` of ``dataset`` in ``mode`` (``INSERT`` or ``UPSERT``). Checks the
    request and the target (table, columns, key constraint) before anything is written; a
    ``SinkError`` says what to change."""
    columns = check_request(dataset, columns, mode)
    if dataset.source == "sqlite":
        from sources.sqlite_sink import SqliteSink

        return await SqliteSink.open(dataset, columns, mode, settings)
    if dataset.source == "postgres":
        from sources.postgres_sink import PostgresSink

        return await PostgresSink.open(dataset, columns, mode, settings)
    if dataset.source == "opensearch":
        from sources.opensearch_sink import OpenSearchSink

        return await OpenSearchSink.open(dataset, columns, mode, settings)
    raise SinkError(f"dataset '{dataset.name}': unknown source '{dataset.source}'")


def check_request(dataset: Dataset, columns: Sequence[Column], mode: str) -> tuple[Column, ...]:
    """The checks every store shares: a known mode, columns named once, and for UPSERT a key
    whose columns are all imported."""
    columns = tuple(columns)
    if mode not in MODES:
        raise SinkError(f"dataset '{dataset.name}': unknown import mode {mode!r} (INSERT or UPSERT)")
    if not columns:
        raise SinkError(f"dataset '{dataset.name}': an import needs at least one column")
    names = [c.name for c in columns]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SinkError(f"dataset '{dataset.name}': column '{repeated[0]}' is imported twice")
    if mode == "UPSERT":
        if not dataset.key:
            raise SinkError(f"dataset '{dataset.name}' has no key, so rows cannot be matched for UPSERT: set "
                            f"`key` in the datasets file, or import in INSERT mode")
        missing = [k for k in dataset.key if k not in names]
        if missing:
            raise SinkError(f"dataset '{dataset.name}': UPSERT matches rows on the key "
                            f"({', '.join(dataset.key)}), but the file has no column '{missing[0]}'")
    return columns


def key_positions(dataset: Dataset, columns: Sequence[Column]) -> list[int]:
    """Where the key's columns are in a row; [] unless every key column is imported."""
    names = [c.name for c in columns]
    if not dataset.key or any(k not in names for k in dataset.key):
        return []
    return [names.index(k) for k in dataset.key]


def check_key_texts(dataset: Dataset, columns: Sequence[Column], positions: Sequence[int],
                    cells: Sequence[Sequence[str]], first_row: int) -> None:
    """``check_keys`` for ``write_text``'s columns (where ``""`` is no value)."""
    for i in positions:
        if not all(cells[i]):  # (quicker than `"" in`, which compares every text)
            n = list(cells[i]).index("")
            raise SinkError(f"dataset '{dataset.name}': row {first_row + n} has no value for the key column "
                            f"'{columns[i].name}'", row=first_row + n)


def describe_key(names: Sequence[str], values: Sequence[Any]) -> str:
    """``sample_id=42``, or ``(site, no)=('Kiruna', 7)`` for a compound key."""
    if len(names) == 1:
        return f"{names[0]}={_show(values[0])}"
    return f"({', '.join(names)})=({', '.join(_show(v) for v in values)})"


def _show(value: Any) -> str:
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else repr(value)


def check_keys(dataset: Dataset, columns: Sequence[Column], positions: Sequence[int], rows: list[Row],
               first_row: int) -> None:
    """Every row has a value in each key column: a row without one cannot be matched (UPSERT),
    and SQLite would even make up a row id for it."""
    for i in positions:
        for n, row in enumerate(rows):
            if row[i] is None:
                raise SinkError(f"dataset '{dataset.name}': row {first_row + n} has no value for the key column "
                                f"'{columns[i].name}'", row=first_row + n)


def check_floats(dataset: Dataset, columns: Sequence[Column], rows: list[Row], first_row: int, store: str,
                 infinite: bool = False) -> None:
    """Refuse NaN (and, with ``infinite``, ±Infinity) in float columns for stores that would keep
    something else (SQLite stores NaN as NULL; JSON has neither). The worker's checks refuse them
    already, so this must cost little: a column is summed in C (NaN and infinities carry through
    a sum; None and 0.0 are left out) and searched cell by cell only when the sum is not finite."""
    for i, column in enumerate(columns):
        if column.type != "float":
            continue
        try:
            total = sum(filter(None, map(itemgetter(i), rows)))
            if math.isfinite(total):
                continue
        except TypeError:  # not numbers: the store's own checks will say
            continue
        for n, row in enumerate(rows):
            v = row[i]
            if v.__class__ is float and (v != v or (infinite and v in (_INF, -_INF))):
                raise SinkError(f"dataset '{dataset.name}': row {first_row + n}, column '{column.name}' holds {v}, "
                                f"which {store} cannot store", row=first_row + n)


_INF = float("inf")
