"""SQLite sink: one write transaction for the whole import.

One read-write connection (the source's is read-only), opened at ``open`` and used from one
thread of its own: sqlite3 blocks, and a single-thread executor keeps every call on the connection
in order, so a ``rollback`` after a cancelled ``write`` runs only once that write's statement
has stopped (a cancelled write stops within one slice of ``_SLICE_ROWS`` rows). ``BEGIN IMMEDIATE``
at the first write takes the write lock then: a database busy with another writer for longer than
``sqlite_busy_timeout_seconds`` fails the import there, as transient, not at commit after all the
work. Each batch is ``executemany`` inside a savepoint (on a constraint failure the batch is undone
and replayed row by row to name the row); ``commit`` is one ``COMMIT``. The write lock is held
until then: other writers wait (and, in rollback-journal mode, readers too once the changes
outgrow the page cache; WAL mode, the demo's, lets exports read on). A killed process leaves the table as before: the
rollback journal or WAL holds the uncommitted pages, and SQLite discards them (WAL: readers never
see them; rollback journal: the next connection that may write rolls the hot journal back, and
until then read-only connections, the source's, fail with "attempt to write a readonly database").

Throughput: 1,000,000 rows × 10 columns in 2.3 s (INSERT) and 2.5 s (UPSERT), WAL, same machine.

Stored values: text as text, integers and floats as they are, booleans as 0/1 (as the demo table
keeps them; the source turns them back into booleans), dates as ``YYYY-MM-DD`` and date-times as
the canonical ISO text (``2024-01-02T03:04:05.5Z``, what the demo table holds, fractions only when
there are any). NaN is refused (SQLite would store NULL).

UPDATE is ``UPDATE table SET c = ? … WHERE key = ?`` (scoped: ``AND scope_column = ?``): the rows
must exist (the worker refused unknown keys beforehand, asking ``stored``), and a slice that
changed fewer rows than it had fails the import, transient (a row deleted meanwhile), so no row
is passed over silently. ``stored`` reads the imported columns of the rows with the batch's keys
on the sink's connection, so rows written earlier in the import count.

UPSERT of a file that lacks a ``NOT NULL`` column of the table (its rows update some columns)
cannot be ``INSERT … ON CONFLICT``: SQLite checks NOT NULL before the conflict. Each slice is then
an UPDATE of the rows whose key exists and an ``INSERT … SELECT … WHERE NOT EXISTS`` of the others
(a new row without the column fails on NOT NULL, as it should; the worker refuses those first).

Otherwise UPSERT is ``INSERT … ON CONFLICT (key) DO UPDATE SET c = excluded.c`` for the imported columns
that are not in the key, so a later row of the file wins over an earlier one with the same key;
it needs a primary key or a unique index (not partial) on exactly the key columns.

A scoped import (``sink_base.RowScope``) adds ``WHERE table.scope_column = excluded.scope_column``
to that ``DO UPDATE``: a row keyed like another tenant's row changes nothing, and the sink fails
(transient) when a slice changed fewer rows than it had, so such a row is never passed over
silently. ``foreign_rows`` finds those rows beforehand, so the worker reports them as row errors.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from sources import receipts
from sources.base import Column, Dataset, Row
from sources.receipts import Receipt
from sources.sink_base import (
    DuplicateKeyError,
    RowScope,
    SinkError,
    check_floats,
    check_keys,
    check_scope,
    describe_key,
    guards_keys,
    key_positions,
    scope_position,
)
from sources.sql import SQLITE
from sources.sqlite import _converter as _source_cells  # stored cells as the source reads them

log = logging.getLogger("dataport.sinks.sqlite")

T = TypeVar("T")

_SLICE_ROWS = 1000
_LOOKUP_ROWS = 500  # keys per foreign_rows query (SQLite binds at most 32,766 parameters)


class SqliteSink:
    def __init__(
        self,
        dataset: Dataset,
        columns: tuple[Column, ...],
        mode: str,
        busy_timeout: float,
        scope: RowScope | None = None,
    ):
        self.dataset = dataset
        self.columns = columns
        self.mode = mode
        self.busy_timeout = busy_timeout
        self.rows = 0
        self._keys = key_positions(dataset, columns)
        self.scope = scope
        self._scope_at = scope_position(dataset, columns, scope)
        self._guard = guards_keys(dataset, scope)  # another tenant's row may hold a key of the file
        self._conn: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dataport-sqlite-sink")
        self._done = False  # committed or rolled back: the sink takes no more calls
        self._failed: str | None = None  # why a write failed: the sink takes no more writes
        self._closed = False
        self._stop = False  # set by a cancelled write: the thread stops at its next slice
        q = SQLITE.quote
        names = [c.name for c in columns]
        self._insert = (
            f"INSERT INTO {q(dataset.table)} ({', '.join(map(q, names))}) VALUES ({', '.join('?' * len(names))})"
        )
        self._update_order: list[int] = []
        self._partial: str | None = None  # UPSERT of a file that lacks a NOT NULL column: its INSERT
        if mode == "UPDATE":
            self._insert = self._update_sql(names)
        if mode == "UPSERT":
            updates = [f"{q(n)} = excluded.{q(n)}" for n in names if n not in dataset.key]
            action = f"DO UPDATE SET {', '.join(updates)}" if updates else "DO NOTHING"
            if self._guard:  # (updates holds the scope column: it is imported and not in the key)
                assert scope is not None
                action += f" WHERE {q(dataset.table)}.{q(scope.column)} = excluded.{q(scope.column)}"
            self._insert += f" ON CONFLICT ({', '.join(map(q, dataset.key))}) {action}"

    def _update_sql(self, names: list[str]) -> str:
        """UPDATE mode's statement: the non-key columns set where the key matches (and, scoped, only
        the tenant's row); its parameters are a row reordered by ``_update_order``."""
        q, key = SQLITE.quote, self.dataset.key
        sets = [n for n in names if n not in key] or [key[0]]  # only the key: a no-op that still counts the row
        where = " AND ".join(f"{q(k)} = ?" for k in key)
        if self.scope is not None:
            where += f" AND {q(self.scope.column)} = ?"
        at = {n: i for i, n in enumerate(names)}
        self._update_order = [at[n] for n in sets] + [at[k] for k in key]
        if self.scope is not None:
            self._update_order.append(at[self.scope.column])
        return f"UPDATE {q(self.dataset.table)} SET {', '.join(f'{q(n)} = ?' for n in sets)} WHERE {where}"

    @classmethod
    async def open(
        cls, dataset: Dataset, columns: tuple[Column, ...], mode: str, settings: Any, scope: RowScope | None = None
    ) -> SqliteSink:
        busy = settings.sqlite_busy_timeout_seconds if settings is not None else 2.0
        sink = cls(dataset, columns, mode, busy, scope)
        try:
            await sink._run(sink._connect)
        except BaseException:
            await sink.close()
            raise
        return sink

    # -- the protocol

    async def write(self, rows: list[Row]) -> None:
        self._check_open()
        if not rows:
            return
        first = self.rows + 1
        try:
            check_keys(self.dataset, self.columns, self._keys, rows, first)
            check_scope(self.dataset, self.columns, self._scope_at, self.scope, rows, first)
            check_floats(self.dataset, self.columns, rows, first, "SQLite")
            await self._run(lambda: self._write(rows, first))
        except BaseException as e:
            self._failed = f"{type(e).__name__}: {e}"
            if isinstance(e, asyncio.CancelledError) and self._conn is not None:
                # The write goes on in its thread: stop it, so that a rollback can follow at once.
                self._stop = True
                self._conn.interrupt()
            raise
        self.rows += len(rows)

    async def foreign_rows(self, rows: list[Row]) -> list[int]:
        """``RowSink.foreign_rows``: a read on the sink's connection (inside its transaction once
        the first write began it, which then holds the write lock: nothing can change between
        this answer and the write)."""
        self._check_open()
        if not self._guard or not rows:
            return []
        return await self._run(lambda: self._foreign(rows))

    async def stored(self, rows: list[Row]) -> list[Row | None]:
        """``RowSink.stored``, on the sink's connection: inside the import's transaction once it
        began, so a key written by an earlier batch of this import counts as stored."""
        self._check_open()
        if not rows or not self._keys:
            return [None] * len(rows)
        return await self._run(lambda: self._stored(rows))

    async def commit(self, receipt: Receipt | None = None) -> int:
        self._check_open()
        await self._run(lambda: self._commit(receipt))
        self._done = True
        await self._run(self._close_connection)
        return self.rows

    async def rollback(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            await self._run(self._rollback)
        except Exception as e:  # a broken connection or file: nothing was committed either way
            log.info("dataset %s: rollback failed (%s); the transaction ends with the connection", self.dataset.name, e)

    async def close(self) -> None:
        if self._closed:
            return
        try:
            await self.rollback()
            await self._run(self._close_connection)
        finally:
            self._closed = True
            self._executor.shutdown(wait=False)

    # -- in the sink's thread

    def _connect(self) -> None:
        path = Path(self.dataset.url)
        if not path.exists():
            raise SinkError(f"The SQLite database for dataset '{self.dataset.name}' is missing: {path}")
        # mode=rw: never create an empty database in place of a missing one.
        self._conn = sqlite3.connect(
            f"file:{quote(str(path))}?mode=rw",
            uri=True,
            timeout=self.busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        info = self._conn.execute(f"PRAGMA table_info({SQLITE.quote(self.dataset.table)})").fetchall()
        if not info:
            raise SinkError(f"dataset '{self.dataset.name}': table '{self.dataset.table}' does not exist in {path}")
        present = {name for _, name, *_ in info}
        for column in self.columns:
            if column.name not in present:
                raise SinkError(
                    f"dataset '{self.dataset.name}': table '{self.dataset.table}' has no column '{column.name}'"
                )
        imported = {c.name for c in self.columns}
        lacking = [name for _, name, _, notnull, default, pk in info if notnull and default is None and not pk]
        if self.mode == "UPSERT" and any(name not in imported for name in lacking):
            # INSERT … ON CONFLICT checks NOT NULL before the conflict: update the rows that exist,
            # then insert those that do not (module docstring).
            q, key = SQLITE.quote, self.dataset.key
            names = [c.name for c in self.columns]
            self._insert = self._update_sql(names)
            absent = " AND ".join(f"{q(k)} = ?" for k in key)
            self._partial = (
                f"INSERT INTO {q(self.dataset.table)} ({', '.join(map(q, names))}) "
                f"SELECT {', '.join('?' * len(names))} "
                f"WHERE NOT EXISTS (SELECT 1 FROM {q(self.dataset.table)} WHERE {absent})"
            )
        if self.mode == "UPSERT" and not self._has_unique(info, set(self.dataset.key)):
            keys = ", ".join(self.dataset.key)
            raise SinkError(
                f"dataset '{self.dataset.name}': UPSERT needs a primary key or unique index on ({keys}) in table "
                f"'{self.dataset.table}', and there is none; create one (CREATE UNIQUE INDEX … ON "
                f"{self.dataset.table} ({keys})) or import in INSERT mode"
            )

    def _has_unique(self, info: list[tuple[Any, ...]], key: set[str]) -> bool:
        assert self._conn is not None
        if {name for _, name, _, _, _, pk in info if pk} == key:
            return True
        q = SQLITE.quote
        for _, index, unique, _, partial in self._conn.execute(f"PRAGMA index_list({q(self.dataset.table)})"):
            if unique and not partial:
                cols = [name for _, _, name in self._conn.execute(f"PRAGMA index_info({q(index)})")]
                if None not in cols and set(cols) == key:
                    return True
        return False

    def _write(self, rows: list[Row], first: int) -> None:
        conn = self._conn
        assert conn is not None
        if not conn.in_transaction:
            conn.execute("BEGIN IMMEDIATE")
        # A savepoint per batch: on a failure the batch can be undone alone and replayed row by
        # row to name the failing row (the earlier batches stay, to tell a key repeated in the
        # file from one already in the table).
        conn.execute("SAVEPOINT dataport_batch")
        try:
            # In slices, so that a cancelled write stops within one slice: interrupt() stops only a
            # statement that is running, and executemany runs a short one per row.
            for start in range(0, len(rows), _SLICE_ROWS):
                if self._stop:
                    raise SinkError(f"dataset '{self.dataset.name}': the write was cancelled")
                part = rows[start : start + _SLICE_ROWS]
                if self._partial is not None:
                    self._write_partial(conn, part)
                    continue
                if self.mode == "UPDATE":
                    order = self._update_order
                    changed = conn.executemany(self._insert, [[row[i] for i in order] for row in part]).rowcount
                    if changed != len(part):  # a row gone since the worker looked (or another tenant's)
                        raise SinkError(
                            f"dataset '{self.dataset.name}': a row this import updates was deleted (or changed "
                            "hands) while it ran; run it again",
                            transient=True,
                        )
                    continue
                changed = conn.executemany(self._insert, part).rowcount
                if self._guard and self.mode == "UPSERT" and changed != len(part):
                    raise SinkError(
                        f"dataset '{self.dataset.name}': another tenant wrote a row with a key of this "
                        "import while it ran; run it again",
                        transient=True,
                    )
        except sqlite3.IntegrityError:
            conn.execute("ROLLBACK TO dataport_batch")
            raise self._explain(rows, first) from None
        conn.execute("RELEASE dataport_batch")

    def _write_partial(self, conn: sqlite3.Connection, part: list[Row]) -> None:
        """UPSERT of a file without some NOT NULL column: UPDATE the rows whose key exists, then
        INSERT the others; a key repeated in the slice is written once, with its last row."""
        assert self._partial is not None
        last = {tuple(row[i] for i in self._keys): row for row in part}
        rows = list(last.values())
        order = self._update_order
        changed = conn.executemany(self._insert, [[row[i] for i in order] for row in rows]).rowcount
        keys = [[row[i] for i in self._keys] for row in rows]
        changed += conn.executemany(self._partial, [[*row, *key] for row, key in zip(rows, keys, strict=True)]).rowcount
        if self._guard and changed != len(rows):
            raise SinkError(
                f"dataset '{self.dataset.name}': another tenant wrote a row with a key of this import while it ran; "
                "run it again",
                transient=True,
            )

    def _foreign(self, rows: list[Row]) -> list[int]:
        conn, scope = self._conn, self.scope
        assert conn is not None and scope is not None
        q = SQLITE.quote
        names = ", ".join(f"k{j}" for j in range(len(self._keys)))
        on = " AND ".join(f"t.{q(k)} = f.k{j}" for j, k in enumerate(self.dataset.key))
        marks = "(" + ", ".join("?" * (len(self._keys) + 1)) + ")"
        found: list[int] = []
        for start in range(0, len(rows), _LOOKUP_ROWS):
            part = rows[start : start + _LOOKUP_ROWS]
            params = [v for n, row in enumerate(part) for v in (start + n, *(row[i] for i in self._keys))]
            found += [
                n
                for (n,) in conn.execute(
                    f"WITH f(n, {names}) AS (VALUES {', '.join([marks] * len(part))}) "
                    f"SELECT DISTINCT f.n FROM f JOIN {q(self.dataset.table)} AS t ON {on} "
                    f"WHERE t.{q(scope.column)} IS NOT ?",
                    [*params, scope.value],
                )
            ]
        return sorted(found)

    def _stored(self, rows: list[Row]) -> list[Row | None]:
        conn = self._conn
        assert conn is not None
        q = SQLITE.quote
        width = len(self._keys)
        names = ", ".join(f"k{j}" for j in range(width))
        on = " AND ".join(f"t.{q(k)} = f.k{j}" for j, k in enumerate(self.dataset.key))
        marks = "(" + ", ".join("?" * (width + 1)) + ")"
        cells = ", ".join(f"t.{q(c.name)}" for c in self.columns)
        scoped, extra = "", []
        if self.scope is not None:
            scoped, extra = f" WHERE t.{q(self.scope.column)} IS ?", [self.scope.value]
        found: list[Row | None] = [None] * len(rows)
        convert = _source_cells(self.columns)
        for start in range(0, len(rows), _LOOKUP_ROWS):
            part = rows[start : start + _LOOKUP_ROWS]
            params = [v for n, row in enumerate(part) for v in (start + n, *(row[i] for i in self._keys))]
            result = conn.execute(
                f"WITH f(n, {names}) AS (VALUES {', '.join([marks] * len(part))}) "
                f"SELECT f.n, {cells} FROM f JOIN {q(self.dataset.table)} AS t ON {on}{scoped}",
                [*params, *extra],
            ).fetchall()
            for n, *values in result:
                found[n] = convert([tuple(values)], 0)[0]
        return found

    def _explain(self, rows: list[Row], first: int) -> SinkError:
        """The failing row of a batch that broke a constraint, found by replaying it row by row."""
        conn = self._conn
        assert conn is not None
        for n, row in enumerate(rows):
            try:
                conn.execute(self._insert, row)
            except sqlite3.IntegrityError as e:
                return self._constraint_error(str(e), row, first + n)
        return SinkError(
            f"dataset '{self.dataset.name}': the rows {first}-{first + len(rows) - 1} broke a "
            f"constraint of table '{self.dataset.table}'"
        )

    def _constraint_error(self, text: str, row: Row, number: int) -> SinkError:
        name, table = self.dataset.name, self.dataset.table
        if text.startswith("UNIQUE constraint failed:"):
            failed = [c.strip().rsplit(".", 1)[-1] for c in text.split(":", 1)[1].split(",")]
            names = [c.name for c in self.columns]
            if all(c in names for c in failed):
                values = [row[names.index(c)] for c in failed]
                key = describe_key(failed, values)
                if set(failed) == set(self.dataset.key):
                    # Earlier rows of this import are in the transaction too: is it in the table?
                    conn = self._conn
                    assert conn is not None
                    conn.execute("ROLLBACK")
                    where = " AND ".join(f"{SQLITE.quote(c)} IS ?" for c in failed)
                    exists = conn.execute(
                        f"SELECT 1 FROM {SQLITE.quote(table)} WHERE {where} LIMIT 1", values
                    ).fetchone()
                    if exists:
                        return DuplicateKeyError(
                            f"a row with {key} already exists in dataset '{name}'; import in "
                            f"UPSERT mode to update it (row {number})",
                            row=number,
                        )
                    return DuplicateKeyError(
                        f"the file has more than one row with {key} (row {number} repeats an "
                        f"earlier one); dataset '{name}' takes one row per key",
                        row=number,
                    )
                return SinkError(
                    f"dataset '{name}': row {number}: another row already has {key}, and table "
                    f"'{table}' allows it only once",
                    row=number,
                )
        if text.startswith("NOT NULL constraint failed:"):
            column = text.split(":", 1)[1].strip().rsplit(".", 1)[-1]
            return SinkError(
                f"dataset '{name}': row {number} has no value for column '{column}', which table '{table}' requires",
                row=number,
            )
        return SinkError(f"dataset '{name}': row {number} was refused by table '{table}': {text}", row=number)

    def _commit(self, receipt: Receipt | None) -> None:
        if self._conn is not None and self._conn.in_transaction:
            if receipt is not None:  # in the same transaction as the rows (sources/receipts.py)
                table = receipts.table_for(self.dataset, SQLITE.quote)
                self._conn.execute(f"CREATE TABLE IF NOT EXISTS {table} {receipts.COLUMNS}")
                self._conn.execute(
                    f"INSERT INTO {table} VALUES (?, ?, ?, ?)", (receipt.task_id, receipt.run, self.rows, _now())
                )
            self._conn.execute("COMMIT")

    def _rollback(self) -> None:
        try:
            if self._conn is not None and self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        finally:
            self._close_connection()

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -- helpers

    def _check_open(self) -> None:
        if self._done:
            raise SinkError(f"dataset '{self.dataset.name}': this import was already committed or rolled back")
        if self._failed:
            raise SinkError(
                f"dataset '{self.dataset.name}': an earlier write of this import failed ({self._failed}); roll it back"
            )

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, _translated, fn, self.dataset)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _translated(fn: Callable[[], T], dataset: Dataset) -> T:
    """Run ``fn``; sqlite3's errors become sink errors that say whether a retry can help."""
    try:
        return fn()
    except sqlite3.OperationalError as e:
        text = str(e)
        # "interrupted": a cancelled write stopped by interrupt() (its caller has gone already).
        if any(t in text for t in ("locked", "busy", "unable to open", "disk I/O", "interrupted")):
            raise SinkError(f"dataset '{dataset.name}' is busy or unreachable: {text}", transient=True) from e
        raise SinkError(f"dataset '{dataset.name}' could not be written: {text}") from e
    except sqlite3.DatabaseError as e:
        raise SinkError(f"dataset '{dataset.name}' could not be written: {e}") from e
