"""PostgreSQL sink: one connection, one transaction, COPY.

The transaction begins at ``open`` and ends at ``commit`` (COMMIT) or ``rollback``/``close``
(ROLLBACK, or the connection closed: the server rolls back a transaction whose connection is
gone, so a killed worker leaves the table as it was). Nothing is visible to readers before COMMIT.

INSERT mode COPYs the rows straight into the table, inside the transaction. That is as atomic as
a staging table (a rollback drops them the same way) and writes each row once instead of twice
(COPY into staging, then INSERT … SELECT): measured on 1,000,000 rows × 10 columns (2 cores,
PostgreSQL 15 on the same machine, other work running), 3.8-4.2 s against 4.5-4.8 s (2.5-3.4 s
COPY + 1.3-2.0 s INSERT … SELECT). A key that exists already fails the COPY with
unique_violation, reported as ``DuplicateKeyError`` (a key repeated in the file too; which of the
two it was is looked up after the rollback).

UPSERT mode COPYs into a temporary staging table made from the target's imported columns
(``CREATE TEMP TABLE … ON COMMIT DROP AS SELECT cols FROM target WITH NO DATA``: the same types,
no constraints, dropped with the transaction whatever its end), then at ``commit`` runs
``INSERT INTO target (cols) SELECT cols FROM staging ON CONFLICT (key) DO UPDATE SET c = EXCLUDED.c``
for the non-key columns (columns not in the file keep their values). A key repeated in the file
would make that statement fail ("cannot affect row a second time"); then it runs again, in a
savepoint, over ``DISTINCT ON (key) … ORDER BY key, ctid DESC``: the last row of the file wins,
as in SQLite and OpenSearch. (COPY appends to the fresh temp table in file order, so ctid order is
file order; the sort is paid only by files that repeat a key.)

Rows travel as COPY text: typed rows formatted by psycopg's C row formatter, rows of a CSV file
as the text they came as (``write_text``); ``sources.postgres_copy_text`` makes that text and
says why, with the measurements.

UPSERT of a file that lacks a NOT NULL column (it updates some columns) cannot use ``ON
CONFLICT``, which checks NOT NULL before the conflict: it runs UPDATE mode's statement, then
``INSERT … SELECT`` of the staged rows whose key no row has.

UPDATE mode COPYs into the staging table as UPSERT does, then at ``commit`` runs ``UPDATE target
SET c = s.c FROM (SELECT DISTINCT ON (key) … ORDER BY key, ctid DESC) s WHERE target.key = s.key``
(scoped: ``AND target.scope_column = s.scope_column``) for the file's non-key columns, and fails
the import (transient) when it changed fewer rows than the file has keys: the worker had refused
unknown keys (asking ``stored``), so a row was deleted meanwhile. ``stored`` reads the rows of a
batch's keys as committed, on the look-up connection, each cell as the source reads it.

The COPY stays open across batches, so the server parses and inserts one batch while the worker
reads the next (3.8-4.2 s against 5.3-5.5 s for one COPY per batch, same machine). A server-side
error in a COPY (a duplicate key, a value that does not fit) only reaches the client when the COPY
ends, so the COPY is ended and restarted every ``COPY_ROWS`` rows: an import that fails early
stops early. Each restart waits for the server to catch up: restarting every 50,000 rows cost
10-20 % of the wall time; every 200,000 rows the cost is lost in the noise of the measurement.

Cells go over as text and the server parses them by the column's type: dates as
``YYYY-MM-DD``, date-times as ISO text with ``Z`` (timestamptz keeps the instant; timestamp
without time zone ignores the ``Z`` and keeps the UTC wall time, as the source reads it),
booleans ``t``/``f``, floats as ``repr`` (shortest exact text; NaN and ±Infinity included).
The session runs in UTC with ISO dates (``SET LOCAL``, so it also holds behind a transaction
pooler). Identifiers come from the dataset and are quoted by the SQL dialect (sources/sql.py).

A scoped import (``sink_base.RowScope``) merges with ``ON CONFLICT (key) DO UPDATE … WHERE
target.scope_column = EXCLUDED.scope_column``: a row keyed like another tenant's row changes
nothing, and when the merge touched fewer rows than the staging table holds keys, the import fails
(transient) rather than passing that row over. In INSERT mode such a row breaks the key and fails
the COPY, as any existing key does. ``foreign_rows`` finds those rows before they are written, on a
second connection (the first is busy with the COPY), so that the worker reports them as row errors.

Columns that are JSONB document fields (``data.depth``) cannot be imported in this version: a
``SinkError`` at ``open`` says so.

Cancellation: a cancelled ``write`` leaves the COPY half sent; psycopg asks the server to cancel
it, and ``rollback`` (or ``close``) ends the COPY with CopyFail, rolls back and closes the
connection, within ``ROLLBACK_TIMEOUT_SECONDS`` (else it just closes the connection: the server
rolls back on its own). A session idle in the transaction for ``IDLE_TIMEOUT`` (a worker stuck,
or gone without closing its socket) is ended by the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import psycopg.errors as pge
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from sources import postgres_sink_lookups as lookups
from sources import receipts
from sources.base import Column, Dataset, Row
from sources.postgres import CONNECT_TIMEOUT_SECONDS, POSTGRES
from sources.postgres_copy_text import cell_error, copy_text
from sources.postgres_sink_errors import explain, plain_error
from sources.receipts import Receipt
from sources.sink_base import (
    RowScope,
    SinkError,
    check_key_texts,
    check_keys,
    check_scope,
    guards_keys,
    key_positions,
    rows_from_text,
    scope_position,
)

log = logging.getLogger("dataport.sinks.postgres")

# psycopg's C row formatter (psycopg[binary] or [c]): a row, the transformer, the buffer it appends
# to. The fallback is Copy.write_row.
_FORMAT_ROW: Callable[[Sequence[Any], Any, bytearray], None] | None
try:
    from psycopg._cmodule import _psycopg

    _FORMAT_ROW = getattr(_psycopg, "format_row_text", None)
except ImportError:  # pragma: no cover - pure-Python psycopg
    _FORMAT_ROW = None

COPY_ROWS = 200_000
IDLE_TIMEOUT = "10min"
ROLLBACK_TIMEOUT_SECONDS = 5.0
APPLICATION_NAME = "dataport-import"

SESSION = (
    f"SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, YMD'; "
    f"SET LOCAL idle_in_transaction_session_timeout = '{IDLE_TIMEOUT}'"
)
_q = POSTGRES.quote  # for statements without parameters (psycopg reads no placeholders in them)

# Columns a row cannot be inserted without: NOT NULL, with no default, not computed.
_NOT_NULL_SQL = """
SELECT a.attname FROM pg_attribute a
WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped AND a.attnotnull
  AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''
"""
_RELKIND_SQL = "SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)"
_COLUMNS_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), COALESCE(bt.typname, t.typname),
       a.attgenerated <> '', a.attidentity = 'a'
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype
WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
# Unique indexes that ON CONFLICT can use: not partial, no expressions, not deferrable; key columns only.
_UNIQUE_SQL = """
SELECT array_agg(a.attname::text)
FROM pg_index i
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY((i.indkey::int2[])[0:i.indnkeyatts - 1])
WHERE i.indrelid = to_regclass(%s) AND i.indisunique AND i.indimmediate AND i.indpred IS NULL
  AND i.indexprs IS NULL
GROUP BY i.indexrelid
"""


class PostgresSink:
    def __init__(self, dataset: Dataset, columns: tuple[Column, ...], mode: str, scope: RowScope | None = None):
        self.dataset = dataset
        self.columns = columns
        self.mode = mode
        self.rows = 0
        self._keys = key_positions(dataset, columns)
        self.scope = scope
        self._scope_at = scope_position(dataset, columns, scope)
        self._guard = guards_keys(dataset, scope)  # another tenant's row may hold a key of the file
        self._conn: psycopg.AsyncConnection | None = None
        self._lookup: psycopg.AsyncConnection | None = None  # foreign_rows' own (autocommit) connection
        self._types: dict[str, str] = {}  # column → its SQL type (format_type), for casts
        self._partial = False  # UPSERT of a file without some NOT NULL column: UPDATE, then INSERT the rest
        self._out_sql: list[str] | None = None  # each column's cell as the source reads it (``stored``)
        self._identity = False  # an imported column is GENERATED ALWAYS AS IDENTITY
        self._copy: psycopg.AsyncCopy | None = None
        self._copy_stack: contextlib.AsyncExitStack | None = None
        self._copy_first = 1  # number of the first row of the COPY in progress
        self._copy_text = False  # that COPY takes write_text's rows (an empty field is NULL)
        # Per column: a float column of type double precision, which takes a float's text as it is.
        self._exact_floats: tuple[bool, ...] = (False,) * len(columns)
        self._done = False
        self._failed: str | None = None
        names = ", ".join(_q(c.name) for c in columns)
        self._names = names
        # The staging table is named in pg_temp explicitly: no table of the database can be taken for it.
        self._staging = f"pg_temp.{_q(f'dataport_staging_{uuid.uuid4().hex[:8]}')}"
        target = self._staging if mode in ("UPSERT", "UPDATE") else _q(dataset.table)
        self._copy_sql = f"COPY {target} ({names}) FROM STDIN"
        # Rows given as text (write_text) have no empty text: an empty field is NULL.
        self._copy_text_sql = f"{self._copy_sql} WITH (NULL '')"

    @classmethod
    async def open(
        cls, dataset: Dataset, columns: tuple[Column, ...], mode: str, settings: Any, scope: RowScope | None = None
    ) -> PostgresSink:
        sink = cls(dataset, columns, mode, scope)
        try:
            sink._conn = await _connect(dataset)
            await sink._inspect()
            await sink._conn.execute(f"BEGIN; {SESSION}")
            if mode in ("UPSERT", "UPDATE"):
                await sink._conn.execute(
                    f"CREATE TEMP TABLE {sink._staging} ON COMMIT DROP AS "
                    f"SELECT {sink._names} FROM {_q(dataset.table)} WITH NO DATA"
                )
        except BaseException as e:
            await sink.close()
            if isinstance(e, psycopg.Error):
                raise plain_error(e, dataset) from e
            raise
        return sink

    # -- the protocol

    async def write(self, rows: list[Row]) -> None:
        self._check_open()
        if rows:
            await self._send(rows, None, len(rows))

    async def write_text(self, columns: Sequence[Sequence[str]], count: int) -> None:
        """``count`` rows as text, column by column (``sources.sinks.TextRowSink``)."""
        self._check_open()
        if count:
            await self._send(None, columns, count)

    async def _send(self, rows: list[Row] | None, texts: Sequence[Sequence[str]] | None, count: int) -> None:
        first = self.rows + 1
        try:
            if texts is not None:
                check_key_texts(self.dataset, self.columns, self._keys, texts, first)
                if self._scope_at is not None:
                    scoped = rows_from_text([self.columns[self._scope_at]], [texts[self._scope_at]])
                    check_scope(self.dataset, self.columns, 0, self.scope, scoped, first)
            else:
                assert rows is not None
                check_keys(self.dataset, self.columns, self._keys, rows, first)
                check_scope(self.dataset, self.columns, self._scope_at, self.scope, rows, first)
            data = copy_text(self.columns, self._exact_floats, texts, count) if texts is not None else None
            if self._copy is not None and self._copy_text != (data is not None):
                await self._end_copy()  # the other kind of rows came before
            if self._copy is None:
                await self._start_copy(first, text=data is not None)
            copy = self._copy
            assert copy is not None
            if data is not None:
                await copy.write(data)
            else:
                if rows is None:  # a text holds a NUL: the typed rows' error names its row and column
                    assert texts is not None
                    rows = rows_from_text(self.columns, texts)
                if _FORMAT_ROW is not None:
                    await copy.write(self._format(rows, first, copy))
                else:  # pure-Python psycopg (or a psycopg without the function): the public API
                    for row in rows:
                        await copy.write_row(row)
            self.rows += count
            if self.rows - self._copy_first + 1 >= COPY_ROWS:
                await self._end_copy()
        except BaseException as e:
            self._failed = f"{type(e).__name__}: {e}".strip()
            if isinstance(e, psycopg.Error):
                raise await explain(self, e) from e
            raise

    async def commit(self, receipt: Receipt | None = None) -> int:
        self._check_open()
        conn = self._conn
        assert conn is not None
        try:
            await self._end_copy()
            if self.mode == "UPSERT":
                await self._merge(conn)
            elif self.mode == "UPDATE":
                await self._update(conn)
            if receipt is not None:
                await self._write_receipt(conn, receipt)
            await conn.execute("COMMIT")
        except BaseException as e:
            self._failed = f"{type(e).__name__}: {e}".strip()
            if isinstance(e, psycopg.Error):
                raise await explain(self, e) from e
            raise
        self._done = True
        await self._close_connection()
        return self.rows

    async def foreign_rows(self, rows: list[Row]) -> list[int]:
        """``RowSink.foreign_rows``, asked on a connection of its own: committed rows of other
        tenants are what it looks for, and the import's connection may be in a COPY."""
        self._check_open()
        if not self._guard or not rows:
            return []
        return await lookups.foreign_rows(self, rows)

    def _array_type(self, column: str) -> str:
        return self._types[column].replace("%", "%%") + "[]"

    async def _write_receipt(self, conn: psycopg.AsyncConnection, receipt: Receipt) -> None:
        """The run's receipt, in the rows' transaction (sources/receipts.py). The lock keeps two
        first imports from both creating the table (a unique violation on its type otherwise)."""
        table = receipts.table_for(self.dataset, _q)
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (receipts.TABLE,))
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {table} {receipts.COLUMNS}")
        await conn.execute(
            f"INSERT INTO {table} VALUES (%s, %s, %s, now()::text)", (receipt.task_id, receipt.run, self.rows)
        )

    async def rollback(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            async with asyncio.timeout(ROLLBACK_TIMEOUT_SECONDS):
                await self._abort_copy()
                conn = self._conn
                if (
                    conn is not None
                    and not conn.closed
                    and conn.pgconn.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR)
                ):
                    await conn.execute("ROLLBACK")
        except Exception as e:  # the connection is gone or stuck: closing it ends the transaction
            log.info(
                "dataset %s: rollback failed (%s: %s); closing the connection", self.dataset.name, type(e).__name__, e
            )
        finally:
            await self._close_connection()

    async def close(self) -> None:
        await self.rollback()
        await self._close_connection()

    # -- COPY

    async def _start_copy(self, first: int, text: bool = False) -> None:
        assert self._conn is not None
        stack = contextlib.AsyncExitStack()
        sql = self._copy_text_sql if text else self._copy_sql
        self._copy = await stack.enter_async_context(self._conn.cursor().copy(sql))
        self._copy_stack, self._copy_first, self._copy_text = stack, first, text

    async def _end_copy(self) -> None:
        """End the COPY in progress; the server's verdict on its rows arrives here."""
        stack, self._copy_stack, self._copy = self._copy_stack, None, None
        if stack is not None:
            await stack.aclose()

    async def _abort_copy(self) -> None:
        """End the COPY in progress with CopyFail: the server drops its rows and fails the transaction."""
        stack, self._copy_stack, self._copy = self._copy_stack, None, None
        if stack is not None:
            reason = SinkError("import rolled back")
            await stack.__aexit__(SinkError, reason, None)

    def _format(self, rows: list[Row], first: int, copy: psycopg.AsyncCopy) -> bytearray:
        """The batch as COPY text, by psycopg's C formatter (the dumpers of ``copy``'s transformer)."""
        out = bytearray()
        tx = copy.formatter.transformer
        fmt = _FORMAT_ROW
        assert fmt is not None  # (the caller writes through Copy.write_row without it)
        try:
            for row in rows:
                fmt(row, tx, out)
        except Exception:
            raise cell_error(fmt, self.dataset, self.columns, rows, first, tx) from None
        return out

    # -- UPDATE, and the stored rows

    async def _update(self, conn: psycopg.AsyncConnection, *, insert_rest: bool = False) -> None:
        """UPDATE mode: the staged rows change the rows with their keys (a key repeated in the file:
        its last row), only the file's columns. Every key must match a row (the worker refused
        unknown keys, asking ``stored``); fewer rows changed (one deleted meanwhile, or another
        tenant's) fails the import, transient."""
        key = ", ".join(_q(k) for k in self.dataset.key)
        sets = [c.name for c in self.columns if c.name not in self.dataset.key] or [self.dataset.key[0]]
        assign = ", ".join(f"{_q(n)} = s.{_q(n)}" for n in sets)
        match = " AND ".join(f"dataport_target.{_q(k)} = s.{_q(k)}" for k in self.dataset.key)
        if self.scope is not None:
            column = _q(self.scope.column)
            match += f" AND dataport_target.{column} = s.{column}"
        latest = f"SELECT DISTINCT ON ({key}) {self._names} FROM {self._staging} ORDER BY {key}, ctid DESC"
        updated = await conn.execute(
            f"UPDATE {_q(self.dataset.table)} AS dataport_target SET {assign} FROM ({latest}) AS s WHERE {match}"
        )
        changed = updated.rowcount
        if insert_rest:  # an UPSERT whose file lacks a NOT NULL column: then the rows that do not exist
            absent = " AND ".join(f"t.{_q(k)} = s.{_q(k)}" for k in self.dataset.key)
            overriding = " OVERRIDING SYSTEM VALUE" if self._identity else ""
            inserted = await conn.execute(
                f"INSERT INTO {_q(self.dataset.table)} ({self._names}){overriding} SELECT {self._names} "
                f"FROM ({latest}) AS s WHERE NOT EXISTS (SELECT 1 FROM {_q(self.dataset.table)} AS t WHERE {absent})"
            )
            changed += inserted.rowcount
        counted = await conn.execute(f"SELECT count(*) FROM (SELECT DISTINCT {key} FROM {self._staging}) k")
        expected = (await counted.fetchone() or (0,))[0]
        if changed != expected and (self._guard or not insert_rest):
            raise SinkError(
                f"dataset '{self.dataset.name}': a row this import updates was deleted (or changed hands) while "
                "it ran; run it again",
                transient=True,
            )

    async def stored(self, rows: list[Row]) -> list[Row | None]:
        """``RowSink.stored``, on the look-up connection (the import's may be in a COPY): the rows
        as committed, each cell as the PostgreSQL source reads it."""
        self._check_open()
        if not rows or not self._keys:
            return [None] * len(rows)
        return await lookups.stored_rows(self, rows)

    async def _lookup_connection(self) -> psycopg.AsyncConnection:
        """The second connection, for reads of committed rows (``postgres_sink_lookups``)."""
        if self._lookup is None:
            self._lookup = await _connect(self.dataset)
        return self._lookup

    async def _drop_lookup(self) -> None:
        lookup, self._lookup = self._lookup, None
        if lookup is not None:
            with contextlib.suppress(Exception):
                await lookup.close()

    # -- UPSERT

    async def _merge(self, conn: psycopg.AsyncConnection) -> None:
        if self._partial:  # INSERT … ON CONFLICT checks NOT NULL before the conflict
            await self._update(conn, insert_rest=True)
            return
        key = ", ".join(_q(k) for k in self.dataset.key)
        updates = [f"{_q(c.name)} = EXCLUDED.{_q(c.name)}" for c in self.columns if c.name not in self.dataset.key]
        action = f"DO UPDATE SET {', '.join(updates)}" if updates else "DO NOTHING"
        overriding = " OVERRIDING SYSTEM VALUE" if self._identity else ""
        if self._guard:  # (updates holds the scope column: it is imported and not in the key)
            assert self.scope is not None
            column = _q(self.scope.column)
            action += f" WHERE dataport_target.{column} = EXCLUDED.{column}"
        insert = f"INSERT INTO {_q(self.dataset.table)} AS dataport_target ({self._names}){overriding}"
        await conn.execute("SAVEPOINT dataport_merge")
        try:
            merged = await conn.execute(
                f"{insert} SELECT {self._names} FROM {self._staging} ON CONFLICT ({key}) {action}"
            )
            expected = self.rows
        except pge.CardinalityViolation:  # a key repeated in the file: the last row wins
            await conn.execute("ROLLBACK TO SAVEPOINT dataport_merge")
            merged = await conn.execute(
                f"{insert} SELECT DISTINCT ON ({key}) {self._names} FROM {self._staging} "
                f"ORDER BY {key}, ctid DESC ON CONFLICT ({key}) {action}"
            )
            expected = -1
        if self._guard:
            if expected < 0:
                counted = await conn.execute(f"SELECT count(*) FROM (SELECT DISTINCT {key} FROM {self._staging}) k")
                expected = (await counted.fetchone() or (0,))[0]
            if merged.rowcount != expected:
                raise SinkError(
                    f"dataset '{self.dataset.name}': another tenant wrote a row with a key of this import "
                    "while it ran; run it again",
                    transient=True,
                )

    # -- the table

    async def _inspect(self) -> None:
        conn, ds = self._conn, self.dataset
        assert conn is not None
        table = _q(ds.table)
        found = await (await conn.execute(_RELKIND_SQL, (table,))).fetchone()
        if found is None:
            raise SinkError(f"dataset '{ds.name}': table '{ds.table}' does not exist")
        if found[0] not in ("r", "p"):
            raise SinkError(
                f"dataset '{ds.name}': '{ds.table}' is not a table (a view, or the like); imports write to tables only"
            )
        info = await (await conn.execute(_COLUMNS_SQL, (table,))).fetchall()
        kinds = {name: kind for name, _, kind, _, _ in info}
        self._exact_floats = tuple(c.type == "float" and kinds.get(c.name) == "float8" for c in self.columns)
        self._types = {name: sql_type for name, sql_type, _, _, _ in info}
        for column in self.columns:
            head = column.name.partition(".")[0]
            if column.name not in kinds and kinds.get(head) == "jsonb":
                raise SinkError(
                    f"dataset '{ds.name}': column '{column.name}' is a field of the JSONB column "
                    f"'{head}'; importing into JSONB documents is not supported in this version"
                )
            if column.name not in kinds:
                raise SinkError(f"dataset '{ds.name}': table '{ds.table}' has no column '{column.name}'")
        chosen = {c.name for c in self.columns}
        for name, _, _, generated, identity in info:
            if name in chosen and generated:
                raise SinkError(
                    f"dataset '{ds.name}': column '{name}' is computed by the database (GENERATED); "
                    f"leave it out of the file"
                )
            self._identity = self._identity or (name in chosen and identity)
        if self.mode == "UPSERT":
            lacking = await (await conn.execute(_NOT_NULL_SQL, (table,))).fetchall()
            self._partial = any(name not in chosen for (name,) in lacking)
        if self.mode in ("UPSERT", "UPDATE"):
            uniques = [set(cols) for (cols,) in await (await conn.execute(_UNIQUE_SQL, (table,))).fetchall()]
            if set(ds.key) not in uniques:
                keys = ", ".join(ds.key)
                raise SinkError(
                    f"dataset '{ds.name}': {self.mode} needs a primary key or unique constraint on ({keys}) in table "
                    f"'{ds.table}', and there is none (a partial, expression or deferrable index does not "
                    f"count); add one, or import in INSERT mode"
                )

    # -- helpers

    def _check_open(self) -> None:
        if self._done:
            raise SinkError(f"dataset '{self.dataset.name}': this import was already committed or rolled back")
        if self._failed:
            raise SinkError(
                f"dataset '{self.dataset.name}': an earlier step of this import failed ({self._failed}); roll it back"
            )

    async def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        lookup, self._lookup = self._lookup, None
        self._copy = self._copy_stack = None
        for each in (conn, lookup):
            if each is not None:
                with contextlib.suppress(Exception):
                    await each.close()


async def _connect(dataset: Dataset) -> psycopg.AsyncConnection:
    params: dict[str, Any] = conninfo_to_dict(dataset.url)  # libpq keywords, which connect() takes as **kwargs
    params.setdefault("application_name", APPLICATION_NAME)
    params.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
    params["client_encoding"] = "UTF8"  # the text the formatter writes; any server encoding converts from it
    try:
        return await psycopg.AsyncConnection.connect(autocommit=True, **params)
    except psycopg.Error as e:
        raise plain_error(e, dataset) from e
    except OSError as e:
        raise SinkError(f"dataset '{dataset.name}' is unavailable: {e}", transient=True) from e
