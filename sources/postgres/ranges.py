"""Large tables read by key ranges on two connections in one exported snapshot.

Two connections (``_key_ranges``, ``_in_turn``): a table of ``SPLIT_BYTES`` or more with a
single integer key that is never NULL, read in key order without a limit, is read by key
ranges of about ``RANGE_BYTES`` of table each (a COPY, or a server-side cursor for
``batches`` and flattened documents, per range). The first connection exports its snapshot
(``pg_export_snapshot()``), the second imports it (``SET TRANSACTION SNAPSHOT``), so the file
is still one snapshot. The connections take the ranges in turn: while one range is handed on
as it arrives, the next is read on the other connection and held in memory (one range ahead
at most), so the server renders on both cores. Other reads use one connection. The two
connections ask for no parallel workers (``max_parallel_workers_per_gather = 0``): PostgreSQL
planned each range's rendered COPY as a Gather Merge, which on 2 cores cost ~0.9 s more
server CPU for 1,000,000 rows and made the read ~15 % slower (median of 8 alternating runs,
4.36 s against 5.12 s on a loaded machine). A read on one connection keeps the planner's choice.
Documents flattened in Python are read by ranges on the helpers' connections instead (``helper_reads``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import psycopg

from sources.base import SourceError
from sources.postgres.columns import _regclass_arg
from sources.postgres.dialect import CONNECT_TIMEOUT_SECONDS, quote_ident
from sources.postgres.errors import _translate
from sources.postgres.fields import resolve
from sources.query import Filter, Query

if TYPE_CHECKING:
    from sources.postgres.source import PostgresSource

log = logging.getLogger("dataport.postgres")

# Large tables read by key ranges on this many connections at once (in one snapshot), each
# range about RANGE_BYTES of the table, at most MAX_RANGES of them.
PARALLEL_CONNECTIONS = 2 if (os.cpu_count() or 1) > 1 else 1
SPLIT_BYTES = 64 * 1024 * 1024
RANGE_BYTES = 8 * 1024 * 1024
MAX_RANGES = 256

# Key ranges in output order, and the exported snapshot they are read in (see _split).
_Split = tuple[list[tuple[int | None, int | None]], str | None]


def _in_range(query: Query, low: int | None, high: int | None) -> Query:
    """``query`` limited to the key range [low, high) (an open end where None)."""
    column = query.dataset.by_name[query.dataset.key[0]]
    return replace(
        query,
        filters=(
            *query.filters,
            *((Filter(column, "GTE", (low,)),) if low is not None else ()),
            *((Filter(column, "LT", (high,)),) if high is not None else ()),
        ),
    )


async def _key_ranges(
    source: PostgresSource, conn: psycopg.AsyncConnection, query: Query
) -> list[tuple[int | None, int | None]]:
    """Ranges of the key, in the order of the output, for reading the query on two connections
    at once; none to read it in one go.

    A large table (``SPLIT_BYTES`` or more), a single integer key that is never NULL, ordered
    by that key alone, no limit. The ranges split the key's span evenly: ``RANGE_BYTES`` of
    table each, so that the range read ahead, held in memory, stays small. Read in the
    transaction's snapshot (min and max come from the key's index when it has one)."""
    assert source._info is not None
    key = source.dataset.key
    if PARALLEL_CONNECTIONS < 2 or len(key) != 1 or query.limit is not None:
        return []
    column = source.dataset.by_name[key[0]]
    if any(s.column.name != column.name for s in query.sort):
        return []
    field = resolve(column, source._info)
    if (
        not field.plain
        or column.type != "integer"
        or field.pg_type not in ("int2", "int4", "int8")
        or column.name not in source._info.not_null
    ):
        return []
    cur = await conn.execute("SELECT pg_total_relation_size(to_regclass(%s))", (_regclass_arg(source.dataset.table),))
    row = await cur.fetchone()
    assert row is not None  # a function's value: one row
    size = row[0]
    if size is None or size < SPLIT_BYTES:  # a view or a partitioned table has no size of its own
        return []
    k = quote_ident(column.name)
    cur = await conn.execute(f"SELECT min({k}), max({k}) FROM {quote_ident(source.dataset.table)}", ())
    row = await cur.fetchone()
    assert row is not None  # aggregates: one row
    low, high = row
    if low is None:
        return []
    n = int(min(high - low + 1, max(2, size // RANGE_BYTES), MAX_RANGES))
    if n < 2:
        return []
    bounds = [low + (high - low + 1) * i // n for i in range(1, n)]
    ranges: list[tuple[int | None, int | None]] = list(zip([None, *bounds], [*bounds, None], strict=True))
    return ranges[::-1] if query.sort and query.sort[0].descending else ranges


async def _split(source: PostgresSource, conns: list[psycopg.AsyncConnection], query: Query) -> _Split:
    """The key ranges to read ``query`` by, and the snapshot of ``conns[0]`` exported for the
    connections that read them; no ranges to read it in one go on ``conns[0]``."""
    try:
        ranges = await source._key_ranges(conns[0], query)
    except psycopg.Error as e:  # the read's first statements: a connection lost here is lost to the read
        raise _translate(e, source.dataset) from e
    if not ranges:
        return [], None
    try:
        cur = await conns[0].execute("SELECT pg_export_snapshot()")
        row = await cur.fetchone()
        assert row is not None  # a function's value: one row
        return ranges, row[0]
    except psycopg.Error as e:  # a standby, say: one connection is enough
        log.warning("dataset %s: reading on one connection (%s)", source.dataset.name, e)
        # The failed statement ended the transaction: the read takes a new one.
        await source._release(conns[0])
        conns[0] = await source._connect(snapshot=True)
        return [], None


async def _second_connection(
    source: PostgresSource,
    conns: list[psycopg.AsyncConnection],
    ranges: list[tuple[int | None, int | None]],
    snapshot_id: str | None,
) -> list[tuple[int | None, int | None]]:
    """The ``ranges`` to read on two connections, a second one (in the snapshot ``snapshot_id``
    of the first, ``conns[0]``) appended to ``conns``; none to read in one go on the first."""
    if not ranges or snapshot_id is None:
        return []
    try:
        conns.append(await source._connect(snapshot=True, snapshot_id=snapshot_id))
    except SourceError as e:  # a pooler that cannot import it, say
        log.warning("dataset %s: reading on one connection (%s)", source.dataset.name, e)
        return []
    # The two connections already keep the cores busy. PostgreSQL would otherwise plan a range's
    # rendered COPY as a Gather Merge over parallel workers: more CPU for the same rows (the
    # workers' tuples pass through shared memory and are merged again), and slower here.
    for conn in conns:
        await conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
    return ranges


async def _in_turn(
    conns: list[psycopg.AsyncConnection], reads: list[Callable[[psycopg.AsyncConnection], AsyncGenerator[Any, None]]]
) -> AsyncGenerator[Any, None]:
    """What the ``reads`` (one key range each, in output order) give, in order, the connections
    taking the reads in turn.

    While one range is handed on as it arrives, the next one is read on the other connection and
    held in memory, so that PostgreSQL renders two ranges at once (on two cores): a range is read
    only once the one before the previous has been handed on (one range ahead at most). Closing
    this generator cancels the readers; the caller closes the connections."""
    n = len(reads)
    buffers: list[collections.deque[Any]] = [collections.deque() for _ in range(n)]
    may_start = [asyncio.Event() for _ in range(n)]
    changed = asyncio.Event()
    failed: list[BaseException] = []
    end = object()

    async def read(c: int) -> None:
        try:
            for i in range(c, n, len(conns)):
                await may_start[i].wait()
                items = reads[i](conns[c])
                async with contextlib.aclosing(items):
                    async for item in items:
                        buffers[i].append(item)
                        changed.set()
                buffers[i].append(end)
                changed.set()
        except Exception as e:  # handed to the consumer, which raises it
            failed.append(e)
            changed.set()

    readers = [asyncio.create_task(read(c)) for c in range(len(conns))]
    try:
        for i in range(n):
            for j in range(i, min(n, i + len(conns))):
                may_start[j].set()
            while True:
                while not buffers[i] and not failed:
                    changed.clear()
                    await changed.wait()
                if failed:
                    raise failed[0]
                item = buffers[i].popleft()
                if item is end:
                    break
                yield item
    finally:
        for task in readers:
            task.cancel()
        await asyncio.wait(readers, timeout=CONNECT_TIMEOUT_SECONDS)
