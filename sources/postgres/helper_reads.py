"""Documents flattened to CSV in helper processes (``sources.helpers``), so that the worker only
fetches and writes; a read by key ranges gives the helpers the ranges themselves.

Read by key ranges, such a read gives the ranges themselves to the helpers (``_RangeReader``):
each helper reads a range on a connection of its own, in the snapshot that the worker's
connection exports and holds until the end, and flattens it; the worker takes the ranges' CSV
in order. The documents (2 GB of JSON text for 40,000 wide ones) then never pass through the
worker: pickling them into pipes and out again cost ~1.6 s of its CPU and ~2.1 s of the
helpers'. Measured on the wide bench (4 rounds each, alternating pairs, against the ``psql
\\copy`` floor of each round): 27.0-31.1 s, median ratio 1.03x, against 29.7-37.8 s, 1.11x,
with the worker's CPU down from 7.5-9 s to ~1.4 s. Fields in the document's key order are taken
as one slice of the decoded values (8x cheaper than picking 2,890 of them).
"""

from __future__ import annotations

import contextlib
import multiprocessing.util
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.types.json import set_json_loads

import formats.csv as csv_format
from dataport.processes import new_event_loop
from sources.base import Column, Dataset, Row
from sources.helpers import HELPERS, HelperPool
from sources.postgres import plans
from sources.postgres.columns import TableInfo
from sources.postgres.extract import _RowError
from sources.postgres.fields import Field
from sources.postgres.plans import _flattened_csv, _Plan, _plan
from sources.postgres.ranges import _in_range, _split
from sources.postgres.readers import _batch_size, _cursor_batches
from sources.query import Query

if TYPE_CHECKING:
    from sources.postgres.source import PostgresSource

# Documents flattened in Python: past this many cells in one read, helper processes flatten them.
HELPERS_AFTER_CELLS = 5_000_000


async def _flattened_csv_batches(
    source: PostgresSource,
    query: Query,
    plan: _Plan,
    writer: csv_format.CsvWriter,
    batch_rows: int,
    formula_guard: bool,
) -> AsyncGenerator[tuple[bytes, int], None]:
    """``csv_batches`` of a plan that flattens documents in Python: the Python writer's header, then
    its CSV of the rows, flattened here or in helper processes."""
    yield writer.begin(), 0
    # Flattening wide documents is CPU-bound Python (40,000 x 2,897 fields: ~18 s of CPU in
    # one process, while PostgreSQL needs ~23 s to hand them over): a read by key ranges gives
    # its ranges to helper processes, which read and flatten them; another read hands its
    # batches to helpers past HELPERS_AFTER_CELLS cells, and this one only fetches and writes.
    start = (
        query.columns,
        source._fields(query.columns),
        formula_guard,
        source._info,
        (plans.INLINE_FIELDS, plans.SMALL_DOCUMENT_BYTES),
    )
    conns = [await source._connect(snapshot=True)]
    try:
        ranges, snapshot_id = split = await _split(source, conns, query)
    except BaseException:
        await source._release(conns[0])
        raise
    if HELPERS and ranges and snapshot_id is not None:
        helpers = HelperPool(_helper_start, (*start, (source.dataset, query, snapshot_id)))
        try:
            async with contextlib.aclosing(
                _ranges_by_helpers(source, helpers, query, plan, ranges, batch_rows)
            ) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            helpers.stop()
            await source._release(conns[0])  # the snapshot's owner: kept until the helpers are done
        return
    helpers = HelperPool(_helper_start, start)
    try:
        async with contextlib.aclosing(source._fetched(query, batch_rows, formula_guard, conns, split)) as fetched:
            async for read, rows, offset in fetched:
                if not helpers.started and HELPERS and offset * len(query.columns) >= HELPERS_AFTER_CELLS:
                    await helpers.start()
                if not helpers.started:
                    yield _flattened_csv(read, writer, rows, offset), len(rows)
                    continue
                helpers.submit(len(rows), _helper_csv, rows, offset)
                async for chunk in helpers.results():
                    yield chunk
        async for chunk in helpers.results(every=True):
            yield chunk
    finally:
        helpers.stop()


async def _ranges_by_helpers(source: PostgresSource, helpers: HelperPool, query: Query, plan: _Plan,
                             ranges: list[tuple[int | None, int | None]], batch_rows: int,
                             ) -> AsyncGenerator[tuple[bytes, int], None]:  # fmt: skip
    """Each key range read and flattened by a helper process on its own connection (in the
    snapshot that ``helpers`` were started with), its CSV taken here in the ranges' order.
    A bad cell's row number is made the read's, from the rows of the ranges before it."""
    size = _batch_size(query, batch_rows)
    offset = 0
    await helpers.start()
    try:
        for i in range(len(ranges) + 1):
            last = i == len(ranges)  # then no more ranges: take every result left
            if not last:
                select, params = source._select(_in_range(query, *ranges[i]), plan)
                helpers.submit(0, _helper_range_csv, select, params, size)  # its rows come with its CSV
            async for (chunk, rows), _ in helpers.results(every=last):
                if rows:
                    yield chunk, rows
                    offset += rows
    except _RowError as e:
        raise _RowError(offset + e.row, e.detail) from None


# In a helper process: the read plan and the writer, made once by _helper_start; for a read by
# key ranges, the reader of its ranges.
_helper: tuple[_Plan, csv_format.CsvWriter] | None = None
_range_reader: _RangeReader | None = None


def _helper_start(
    columns: tuple[Column, ...],
    fields: list[Field],
    formula_guard: bool,
    info: TableInfo,
    limits: tuple[int, int],
    ranges_of: tuple[Dataset, Query, str] | None = None,
) -> None:
    global _helper, _range_reader
    plans.INLINE_FIELDS, plans.SMALL_DOCUMENT_BYTES = limits  # the parent's, so that the plan is the parent's
    _helper = (_plan(fields, formula_guard, info), csv_format.CsvWriter(columns, formula_guard=formula_guard))
    _range_reader = _RangeReader(*ranges_of, info) if ranges_of else None


def _helper_csv(rows: list[Row], offset: int) -> bytes:
    assert _helper is not None
    return _flattened_csv(*_helper, rows, offset)


def _helper_range_csv(select: str, params: tuple[Any, ...], size: int) -> tuple[bytes, int]:
    assert _helper is not None and _range_reader is not None
    return _range_reader.csv(select, params, size, *_helper)


class _RangeReader:
    """In a helper process: key ranges of one read, each read on this process's own connection, in
    the read's exported snapshot, and flattened to CSV here.

    So the documents never pass through the worker: 40,000 wide documents are 2 GB of JSON text,
    which cost ~1.6 s of the worker's CPU to pickle into pipes and ~2.1 s of the helpers' to take
    out, on top of what libpq needs to receive them once. The connection opens with the first
    range and is closed when the process ends (the read is over, or abandoned: the pool stops it).
    On uvloop where it is installed, as in the worker: less CPU per wait on the socket."""

    def __init__(self, dataset: Dataset, query: Query, snapshot_id: str, info: TableInfo):
        from sources.postgres.source import PostgresSource  # which imports this module

        self.loop = new_event_loop()
        self.source = PostgresSource(dataset)
        self.source._info = info
        self.query = query
        self.snapshot_id = snapshot_id
        self.conn: psycopg.AsyncConnection | None = None

    def csv(self, select: str, params: tuple[Any, ...], size: int, plan: _Plan, writer: csv_format.CsvWriter,
            ) -> tuple[bytes, int]:  # fmt: skip
        """The range's rows (``select``, ``size`` at a time) as CSV, and how many there are."""
        return self.loop.run_until_complete(self._csv(select, params, size, plan, writer))

    async def _csv(self, select: str, params: tuple[Any, ...], size: int, plan: _Plan, writer: csv_format.CsvWriter,
                   ) -> tuple[bytes, int]:  # fmt: skip
        if self.conn is None:
            self.conn = await self.source._connect(snapshot=True, snapshot_id=self.snapshot_id)
            set_json_loads(bytes, self.conn)  # type: ignore[arg-type]  # JSON text as bytes, as in PostgresSource._fetched
            # Run as the process ends, so that the server sees the client leave rather than lose it.
            multiprocessing.util.Finalize(self, self.close, exitpriority=10)
        parts, rows = [], 0
        try:
            async with contextlib.aclosing(_cursor_batches(self.conn, select, params, size)) as batches:
                async for batch in batches:  # the next batch is rendered by the server meanwhile
                    parts.append(_flattened_csv(plan, writer, batch, rows))
                    rows += len(batch)
        except psycopg.Error as e:
            raise await self.source._explain(self.conn, self.query, e) from e
        return b"".join(parts), rows

    def close(self) -> None:
        if self.conn is not None:
            self.loop.run_until_complete(self.source._release(self.conn))
