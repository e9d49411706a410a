"""SQLite source: the default store, and the demo dataset's home.

Reads run in a worker thread (sqlite3 blocks), one ``fetchmany`` per batch, on a read-only
connection, so memory holds one batch at a time and the event loop stays free.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

from sources.base import Column, Dataset, Row, SourceError, TransientSourceError
from sources.query import Query, QueryTooComplex
from sources.sql import SQLITE, compile_query

# SQLite types as PRAGMA table_info reports them, mapped to column types for "discover".
_DECLARED_TYPES = {
    "INTEGER": "integer", "INT": "integer", "BIGINT": "integer", "REAL": "float", "FLOAT": "float",
    "DOUBLE": "float", "NUMERIC": "float", "BOOLEAN": "boolean", "BOOL": "boolean", "DATE": "date",
    "DATETIME": "datetime", "TIMESTAMP": "datetime",
}  # fmt: skip


class SqliteSource:
    def __init__(self, dataset: Dataset, busy_timeout: float = 2.0):
        self.dataset = dataset
        self.busy_timeout = busy_timeout
        self._connections: set[sqlite3.Connection] = set()

    def _connect(self) -> sqlite3.Connection:
        path = Path(self.dataset.url)
        if not path.exists():
            raise SourceError(f"The SQLite database for dataset '{self.dataset.name}' is missing: {path}")
        _roll_back_hot_journal(path, self.busy_timeout)
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=self.busy_timeout, check_same_thread=False)
        self._connections.add(conn)
        return conn

    def _release(self, conn: sqlite3.Connection) -> None:
        self._connections.discard(conn)
        conn.close()

    async def count(self, query: Query, cap: int | None = None) -> int:
        compiled = compile_query(query, self.dataset.table, SQLITE, count_cap=cap)

        def run() -> int:
            conn = self._connect()
            try:
                count: int = conn.execute(compiled.count, compiled.params).fetchone()[0]
                return count
            finally:
                self._release(conn)

        return await asyncio.to_thread(_translated, run, self.dataset)

    async def counted(self, query: Query, rows: int) -> None:
        """Nothing to do: reads do not depend on the count."""

    async def batches(self, query: Query, batch_rows: int) -> AsyncGenerator[list[Row], None]:
        compiled = compile_query(query, self.dataset.table, SQLITE)
        convert = _converter(query.columns)
        conn = await asyncio.to_thread(_translated, self._connect, self.dataset)
        try:
            cursor = await asyncio.to_thread(
                _translated, lambda: conn.execute(compiled.select, compiled.params), self.dataset
            )
            offset = 0
            while True:
                rows = await asyncio.to_thread(_translated, lambda: cursor.fetchmany(batch_rows), self.dataset)
                if not rows:
                    return
                yield convert(rows, offset)
                offset += len(rows)
        finally:
            conn.interrupt()  # a cancelled export stops the statement at once
            await asyncio.to_thread(self._release, conn)

    async def close(self) -> None:
        for conn in list(self._connections):
            conn.interrupt()


def _roll_back_hot_journal(path: Path, busy_timeout: float) -> None:
    """A writer killed mid-transaction in rollback-journal mode leaves a hot journal, which only a
    connection that may write can roll back; until one does, read-only connections fail ("attempt
    to write a readonly database"). So a reader that finds one opens the file read-write once: the
    rollback happens on that connection's first read, and the table is as it was before the import."""
    journal = path.with_name(path.name + "-journal")
    try:
        if journal.stat().st_size == 0:
            return
    except FileNotFoundError:
        return
    conn = sqlite3.connect(path, timeout=busy_timeout)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error:
        pass  # a live writer holds it: that is not a hot journal, and the read below waits as usual
    finally:
        conn.close()


def discover_columns(path: str, table: str) -> tuple[Column, ...]:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            info = conn.execute(f"PRAGMA table_info({SQLITE.quote(table)})").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise SourceError(f"{path}: {e}") from None
    if not info:
        raise SourceError(f"table '{table}' not found in {path}")
    return tuple(
        Column(name, _DECLARED_TYPES.get((decl or "").split("(")[0].upper(), "string"), required=bool(notnull))
        for _, name, decl, notnull, _, _ in info
    )


# SQLite's words for a statement past its limits (expression depth, bound values, terms, sizes).
_TOO_COMPLEX = (
    "Expression tree is too large",
    "too many SQL variables",
    "too many terms",
    "too many arguments",
    "too complex",
    "parser stack overflow",
)


def _translated(fn: Callable[[], Any], dataset: Dataset) -> Any:
    """Run ``fn``; sqlite3's errors become source errors that say whether a retry can help."""
    try:
        return fn()
    except sqlite3.OperationalError as e:
        text = str(e)
        if "locked" in text or "busy" in text or "unable to open" in text or "disk I/O" in text:
            raise TransientSourceError(f"dataset '{dataset.name}' is busy: {text}") from e
        if "interrupted" in text:
            raise asyncio.CancelledError() from e
        if any(sign in text for sign in _TOO_COMPLEX):
            raise QueryTooComplex(f"dataset '{dataset.name}': the query is too large for SQLite ({text})") from e
        raise SourceError(f"dataset '{dataset.name}' could not be read: {text}") from e
    except sqlite3.DatabaseError as e:
        raise SourceError(f"dataset '{dataset.name}' could not be read: {e}") from e
    except OverflowError as e:  # a bound integer past 64 bits; build_query refuses these first
        raise QueryTooComplex(f"dataset '{dataset.name}': a filter value is out of SQLite's range ({e})") from e


def _converter(columns: tuple[Column, ...]) -> Callable[[list[Row], int], list[Row]]:
    """SQLite is dynamically typed: booleans come back as 0/1, and a numeric column can hold
    text. Convert the one, refuse the other with a message that says which row and column."""
    booleans = [i for i, c in enumerate(columns) if c.type == "boolean"]
    numerics = [i for i, c in enumerate(columns) if c.type in ("integer", "float")]

    def convert(rows: list[Row], offset: int) -> list[Row]:
        for i in numerics:
            for n, row in enumerate(rows):
                if row[i].__class__ is str or row[i].__class__ is bytes:
                    column = columns[i]
                    raise SourceError(
                        f"Row {offset + n + 1}: column '{column.name}' holds {row[i]!r}, which is not "
                        f"{'an' if column.type == 'integer' else 'a'} {column.type}. Correct the value "
                        f"in the source table, or declare the column as string."
                    )
        if not booleans:
            return rows
        out = []
        for row in rows:
            cells = list(row)
            for i in booleans:
                if cells[i] is not None:
                    cells[i] = bool(cells[i])
            out.append(tuple(cells))
        return out

    return convert
