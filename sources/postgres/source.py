"""``PostgresSource``: the ``Source`` interface over a PostgreSQL table, and the order of a read.

Each method is a step of a read; the work is done in the modules it calls: ``dialect`` (quoting,
session), ``columns`` (the table's columns), ``fields`` and ``plans`` (what is selected, and how
rows are made of it), ``readers`` (rows off a connection), ``ranges`` (two connections, one
snapshot), ``helper_reads`` (documents flattened in helper processes), ``errors``.

CSV fast path (``csv_batches``)
    ``COPY (SELECT …) TO STDOUT WITH (FORMAT csv)``, each cell rendered in SQL the way
    formats/csv.py writes it (``fields.Field.csv_sql``), so the bytes stay in C from the server to
    the file; the rows are taken from libpq in bulk (``readers``). A plan that flattens documents
    in Python uses the Python writer instead (``helper_reads``).

    Measured (2 cores shared with other engineers' test runs, load average 3.5-5; PostgreSQL 15
    on the same machine; 1,000,000 rows × 20 columns, see bench/postgres_export.py): the SQL
    rendering cost 2.0-2.5 s of server time against 1.1-1.2 s for ``psql``'s plain COPY; the
    guard's ``regexp_replace`` on every cell was ~0.45 s of that, reshaping date-time text
    ~0.35 s, the float ``CASE`` and booleans little; now ~1.5 s. Taking the rows from libpq in
    bulk cut this process's CPU from 1.5 s to 0.7 s. ``csv_batches`` alone: 3.4-4.3 s before, 2.3-2.5 s
    with one connection. ``batches`` + ``CsvWriter`` (formats/csv.py) is slower here: 4.9-7.5 s
    (3.3 s of Python CPU, against 0.7 s), as ``FETCH``-ing typed rows leaves the server idle
    while psycopg converts each batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Sequence
from functools import partial
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg.types.json import set_json_loads

import formats.csv as csv_format
from sources.base import Column, Dataset, Row, SourceError, TransientSourceError
from sources.postgres.columns import TableInfo, read_table_info
from sources.postgres.dialect import _SESSION, CONNECT_TIMEOUT_SECONDS, POSTGRES, quote_literal
from sources.postgres.errors import _explain, _translate
from sources.postgres.fields import Field, column_sql_for, resolve
from sources.postgres.helper_reads import _flattened_csv_batches
from sources.postgres.plans import _output_query, _Plan, _plan
from sources.postgres.ranges import _in_range, _in_turn, _key_ranges, _second_connection, _Split, _split
from sources.postgres.readers import _batch_size, _copy_chunks, _cursor_batches
from sources.query import Query
from sources.sql import compile_query


class PostgresSource:
    """A PostgreSQL table (its JSONB documents' fields as columns) as a ``Source``."""

    def __init__(self, dataset: Dataset, settings: Any = None):
        self.dataset = dataset
        self.settings = settings
        self._info: TableInfo | None = None
        self._connections: set[psycopg.AsyncConnection] = set()
        self._table = dataset.table.replace("%", "%%")  # compile_query quotes it; psycopg reads %%

    # connections ----------------------------------------------------------------------------

    async def _connect(self, *, snapshot: bool, snapshot_id: str | None = None) -> psycopg.AsyncConnection:
        """A connection in a read-only transaction: REPEATABLE READ with ``snapshot`` (one snapshot
        for the whole read), the exported snapshot ``snapshot_id`` of another connection if given."""
        params: dict[str, Any] = conninfo_to_dict(self.dataset.url)  # libpq keywords, which connect() takes as **kwargs
        params.setdefault("application_name", "dataport")
        params.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
        try:
            conn = await psycopg.AsyncConnection.connect(autocommit=True, **params)
        except psycopg.Error as e:
            raise _translate(e, self.dataset) from e
        except OSError as e:
            raise TransientSourceError(f"dataset '{self.dataset.name}' is unavailable: {e}") from e
        self._connections.add(conn)
        try:
            begin = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if snapshot else "BEGIN READ ONLY"
            if snapshot_id is not None:  # before any query of the transaction, as PostgreSQL requires
                begin += f"; SET TRANSACTION SNAPSHOT {quote_literal(snapshot_id)}"
            await conn.execute(f"{begin}; {_SESSION}")
            if self._info is None:
                self._info = await read_table_info(conn, self.dataset)
        except BaseException as e:
            await self._release(conn)
            if isinstance(e, psycopg.Error):
                raise _translate(e, self.dataset) from e
            raise
        return conn

    async def _release(self, conn: psycopg.AsyncConnection) -> None:
        """Stop whatever runs on ``conn`` and close it: the server drops cursor and snapshot."""
        self._connections.discard(conn)
        if conn.closed:
            return
        with contextlib.suppress(Exception):
            if conn.pgconn.transaction_status == TransactionStatus.ACTIVE:
                await conn.cancel_safe(timeout=1.0)
        with contextlib.suppress(Exception):
            await conn.close()

    async def close(self) -> None:
        for conn in list(self._connections):
            await self._release(conn)

    async def table_info(self) -> TableInfo:
        if self._info is None:
            conn = await self._connect(snapshot=False)
            await self._release(conn)
        assert self._info is not None
        return self._info

    @property
    def info(self) -> TableInfo:
        """The table as the first connection read it: every read connects before it needs this."""
        assert self._info is not None
        return self._info

    def _fields(self, columns: Sequence[Column]) -> list[Field]:
        return [resolve(c, self.info) for c in columns]

    # reading ---------------------------------------------------------------------------------

    async def count(self, query: Query, cap: int | None = None) -> int:
        conn = await self._connect(snapshot=False)
        try:
            compiled = compile_query(query, self._table, POSTGRES, count_cap=cap, column_sql=column_sql_for(self.info))
            cur = await conn.execute(compiled.count, compiled.params)
            row = await cur.fetchone()
            return int(row[0]) if row else 0
        except psycopg.Error as e:
            raise await self._explain(conn, query, e) from e
        finally:
            await self._release(conn)

    async def counted(self, query: Query, rows: int) -> None:
        """Nothing to do: reads do not depend on the count."""

    async def batches(self, query: Query, batch_rows: int) -> AsyncGenerator[list[Row], None]:
        async with contextlib.aclosing(self._fetched(query, batch_rows, False)) as fetched:
            async for plan, rows, offset in fetched:
                yield plan.build(rows, offset) if plan.build else rows

    async def _fetched(
        self,
        query: Query,
        batch_rows: int,
        formula_guard: bool,
        conns: list[psycopg.AsyncConnection] | None = None,
        split: _Split | None = None,
    ) -> AsyncGenerator[tuple[_Plan, list[Row], int], None]:
        """The read plan's SELECT list as fetched, in batches, each with the plan and the number of
        rows before it. On the caller's connection and ``_split`` of the query, if it has them."""
        conns = conns or [await self._connect(snapshot=True)]
        try:
            plan = _plan(self._fields(query.columns), formula_guard, self.info)
            size = _batch_size(query, batch_rows)
            ranges = await _second_connection(self, conns, *(split or await _split(self, conns, query)))
            for conn in conns:
                # Documents come as the bytes of their JSON text, parsed in _plan (in a helper
                # process, perhaps): no UTF-8 decoding into str here, nor encoding for the helper.
                set_json_loads(bytes, conn)  # type: ignore[arg-type]  # psycopg passes the loader bytes, never str
            try:
                offset = 0
                if not ranges:
                    batches = _cursor_batches(conns[0], *self._select(query, plan), size)
                else:
                    selects = [self._select(_in_range(query, *r), plan) for r in ranges]
                    batches = _in_turn(
                        conns,
                        [
                            partial(_cursor_batches, select=select, params=params, size=size)
                            for select, params in selects
                        ],
                    )
                async with contextlib.aclosing(batches):
                    async for rows in batches:
                        yield plan, rows, offset
                        offset += len(rows)
            except psycopg.Error as e:
                raise await self._explain(conns[0], query, e) from e
        finally:
            for conn in conns:
                await self._release(conn)

    def _select(self, query: Query, plan: _Plan) -> tuple[str, tuple[Any, ...]]:
        """The SELECT of ``query`` reading ``plan``'s expressions, and its parameters."""
        out_query, out_sql = _output_query(query, plan.exprs)
        column_sql = column_sql_for(self.info)
        compiled = compile_query(out_query, self._table, POSTGRES, column_sql=lambda c: out_sql(c) or column_sql(c))
        return compiled.select, compiled.params

    async def csv_batches(
        self, query: Query, batch_rows: int, *, formula_guard: bool
    ) -> AsyncGenerator[tuple[bytes, int], None]:
        """The query as CSV bytes, like ``CsvWriter`` writes them: ``(header, 0)`` first, then
        ``(chunk, rows in chunk)``. Through COPY when every cell can be rendered in SQL."""
        writer = csv_format.CsvWriter(query.columns, formula_guard=formula_guard)
        await self.table_info()
        plan = _plan(self._fields(query.columns), formula_guard, self.info)
        if plan.csv_exprs is None:  # documents flattened in Python: the Python writer
            flattened = _flattened_csv_batches(self, query, plan, writer, batch_rows, formula_guard)
            async with contextlib.aclosing(flattened):
                async for chunk in flattened:
                    yield chunk
            return

        conns = [await self._connect(snapshot=True)]
        try:
            ranges = await _second_connection(self, conns, *await _split(self, conns, query))
            yield writer.begin(), 0
            try:
                if not ranges:
                    chunks = _copy_chunks(conns[0], *self._copy(query, plan), batch_rows)
                    async with contextlib.aclosing(chunks):
                        async for chunk in chunks:
                            yield chunk
                    return
                statements = [self._copy(_in_range(query, *r), plan) for r in ranges]
                chunks = _in_turn(
                    conns,
                    [
                        partial(_copy_chunks, statement=statement, params=params, batch_rows=batch_rows)
                        for statement, params in statements
                    ],
                )
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        yield chunk
            except psycopg.Error as e:
                raise await self._explain(conns[0], query, e) from e
        finally:
            for conn in conns:
                await self._release(conn)

    def _copy(self, query: Query, plan: _Plan) -> tuple[str, tuple[Any, ...] | None]:
        """The COPY statement of ``query`` with its cells rendered in SQL, and its parameters."""
        assert plan.csv_exprs is not None
        out_query, out_sql = _output_query(query, plan.csv_exprs)
        column_sql = column_sql_for(self.info)
        compiled = compile_query(out_query, self._table, POSTGRES, column_sql=lambda c: out_sql(c) or column_sql(c))
        statement = f"COPY ({compiled.select}) TO STDOUT WITH (FORMAT csv)"
        if not compiled.params:  # psycopg reads no placeholders (nor %%) in a COPY without parameters
            return statement.replace("%%", "%"), None
        return statement, compiled.params

    async def _key_ranges(self, conn: psycopg.AsyncConnection, query: Query) -> list[tuple[int | None, int | None]]:
        """The key ranges to read ``query`` by on two connections (``ranges._key_ranges``)."""
        return await _key_ranges(self, conn, query)

    # errors ----------------------------------------------------------------------------------

    async def _explain(self, conn: psycopg.AsyncConnection, query: Query, e: psycopg.Error) -> SourceError:
        """A data error (a value that does not cast) names the column and the row if it can."""
        return await _explain(self, conn, query, e)
