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
anyway (PostgreSQL's COPY), so that a CSV import never makes typed values only to print them again.
The cells are what ``formats.column_checker.ColumnChecker`` gives for ``TEXT``: ``""`` is no value
(None; there is no empty text, as in CSV), integers are decimal, booleans ``t``/``f``, dates,
date-times and text as in typed rows, and floats either their ``repr`` or a plain decimal that
``float()`` reads as the value (``PLAIN_FLOAT_TEXT``: ``1.50``, ``2e-3``; bounded, so that it
neither overflows nor underflows): a sink that does not read such text exactly as ``float()`` does
makes it ``repr(float(text))``. All but text is ASCII. What is stored must be what ``write`` stores
for the typed rows (``sink_base.rows_from_text``), errors included; rows count on across both
methods.

What every sink shares (errors, key and float checks) is in ``sources.sink_base``, which the sinks
import; this module imports the sinks, only to open one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from sources.base import Column, Dataset, Row
from sources.sink_base import RowScope, SinkError

if TYPE_CHECKING:
    from sources.receipts import Receipt

MODES = ("INSERT", "UPSERT", "UPDATE")
# Modes that match rows on the key and touch only the file's columns of the rows they change.
KEYED_MODES = ("UPSERT", "UPDATE")


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

    async def foreign_rows(self, rows: list[Row]) -> list[int]:
        """For a scoped import (``sink_base.RowScope``): the indexes of ``rows`` whose key matches a
        stored row of another tenant, which the import must not touch; [] when the key cannot
        (``sink_base.guards_keys``). Reads only: a dry run asks it too."""
        ...

    async def stored(self, rows: list[Row]) -> list[Row | None]:
        """For each of ``rows``, the stored row with its key (the values of the sink's columns, as
        the dataset's source reads them, so they compare with ``sink_base.same_value``), or None
        when no row has that key; of a scoped import, the tenant's own rows only. Reads only: the
        worker asks it to tell new rows from updated and unchanged ones (UPDATE, UPSERT, dry runs,
        results files)."""
        ...


class TextRowSink(RowSink, Protocol):
    async def write_text(self, columns: Sequence[Sequence[str]], count: int) -> None:
        """One batch of ``count`` rows given as text, one sequence of cells per column (in
        ``columns`` order); see the module docstring."""
        ...


async def open_sink(
    dataset: Dataset, columns: Sequence[Column], mode: str, settings: Any, scope: RowScope | None = None
) -> RowSink:
    """A sink writing ``columns`` of ``dataset`` in ``mode`` (``INSERT``, ``UPSERT`` or ``UPDATE``), for the
    tenant ``scope`` when the dataset is scoped. Checks the request and the target (table, columns,
    key constraint) before anything is written; a ``SinkError`` says what to change."""
    columns = check_request(dataset, columns, mode)
    if (scope is None) != (dataset.scope is None):
        raise SinkError(f"dataset '{dataset.name}': an import is scoped exactly when its dataset is")
    if dataset.source == "sqlite":
        from sources.sqlite_sink import SqliteSink

        return await SqliteSink.open(dataset, columns, mode, settings, scope)
    if dataset.source == "postgres":
        from sources.postgres_sink import PostgresSink

        return await PostgresSink.open(dataset, columns, mode, settings, scope)
    if dataset.source == "opensearch":
        from sources.opensearch_sink import OpenSearchSink

        return await OpenSearchSink.open(dataset, columns, mode, settings, scope=scope)
    raise SinkError(f"dataset '{dataset.name}': unknown source '{dataset.source}'")


def check_request(dataset: Dataset, columns: Sequence[Column], mode: str) -> tuple[Column, ...]:
    """The checks every store shares: a known mode, columns named once, and for UPSERT and
    UPDATE a key whose columns are all imported."""
    columns = tuple(columns)
    if mode not in MODES:
        raise SinkError(f"dataset '{dataset.name}': unknown import mode {mode!r} (INSERT, UPSERT or UPDATE)")
    if not columns:
        raise SinkError(f"dataset '{dataset.name}': an import needs at least one column")
    names = [c.name for c in columns]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SinkError(f"dataset '{dataset.name}': column '{repeated[0]}' is imported twice")
    if mode in KEYED_MODES:
        if not dataset.key:
            raise SinkError(
                f"dataset '{dataset.name}' has no key, so rows cannot be matched for {mode}: set "
                f"`key` in the datasets file, or import in INSERT mode"
            )
        missing = [k for k in dataset.key if k not in names]
        if missing:
            raise SinkError(
                f"dataset '{dataset.name}': {mode} matches rows on the key "
                f"({', '.join(dataset.key)}), but the file has no column '{missing[0]}'"
            )
    return columns
