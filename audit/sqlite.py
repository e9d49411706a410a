"""The embedded default: the audit log in one SQLite file under the data dir (``audit.sqlite3``).

The api (reading ``auditEvents``) and the workers (the drain) open the same file; WAL lets them
read while one writes. ``append`` runs in ``BEGIN IMMEDIATE``, which takes the file's write lock
before the head is read: two drains cannot link two records after the same head.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from audit import sql
from audit.base import Filters, Page
from audit.chain import GENESIS, seal_all
from audit.records import AuditRecord, Pending

TABLE = "audit_events"


class SqliteAuditStore:
    name = "sqlite"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # an audit record survives a power cut once drained
            for statement in sql.create_table(TABLE, "INTEGER"):
                conn.execute(statement)
            self._conn = conn
        return self._conn

    async def _run(self, fn: Any, *args: Any) -> Any:
        def locked() -> Any:
            with self._lock:
                return fn(self._connection(), *args)

        return await asyncio.to_thread(locked)

    async def append(self, records: Sequence[Pending]) -> int:
        if not records:
            return 0
        return int(await self._run(_append, list(records)))

    async def scan(self, filters: Filters | None = None) -> AsyncIterator[AuditRecord]:
        async for record in sql.scan(self._rows, TABLE, filters, "?"):
            yield record

    async def page(self, filters: Filters, first: int, before_seq: int | None = None) -> Page:
        return await sql.page(self._rows, TABLE, filters, "?", first, before_seq)

    async def _rows(self, query: str, params: list[Any]) -> list[tuple[Any, ...]]:
        return list(await self._run(_fetch, query, params))

    async def anchor(self) -> str:
        rows = await self._run(_fetch, f"SELECT hash FROM {TABLE}_anchor", [])
        return str(rows[0][0]) if rows else GENESIS

    async def prune(self, before: str) -> int:
        return int(await self._run(_prune, before))

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _fetch(conn: sqlite3.Connection, query: str, params: list[Any]) -> list[tuple[Any, ...]]:
    return conn.execute(query, params).fetchall()


def _append(conn: sqlite3.Connection, records: list[Pending]) -> int:
    conn.execute("BEGIN IMMEDIATE")
    try:
        ids = [r.id for r in records]
        known = {
            row[0]
            for start in range(0, len(ids), 500)
            for row in conn.execute(
                f"SELECT id FROM {TABLE} WHERE id IN ({','.join('?' * len(ids[start : start + 500]))})",
                ids[start : start + 500],
            )
        }
        fresh = sql.fresh(records, known)  # a record twice in one batch is stored once too
        if fresh:
            head = conn.execute(f"SELECT seq, hash FROM {TABLE} ORDER BY seq DESC LIMIT 1").fetchone()
            if head is None:
                anchor = conn.execute(f"SELECT seq, hash FROM {TABLE}_anchor").fetchone()
                head = anchor or (0, GENESIS)
            sealed = seal_all(int(head[0]) + 1, str(head[1]), fresh)
            conn.executemany(sql.insert(TABLE, "?"), [sql.to_row(r) for r in sealed])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return len(fresh)


def _prune(conn: sqlite3.Connection, before: str) -> int:
    conn.execute("BEGIN IMMEDIATE")
    try:
        last = conn.execute(
            f"SELECT seq, hash FROM {TABLE} WHERE at < ? ORDER BY seq DESC LIMIT 1", [before]
        ).fetchone()
        removed = 0
        if last is not None:
            # Everything up to the newest old record, so the kept ones stay one unbroken chain.
            removed = conn.execute(f"DELETE FROM {TABLE} WHERE seq <= ?", [last[0]]).rowcount
            conn.execute(
                f"INSERT INTO {TABLE}_anchor (one, hash, seq) VALUES (1, ?, ?) "
                "ON CONFLICT (one) DO UPDATE SET hash = excluded.hash, seq = excluded.seq",
                [last[1], last[0]],
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return removed
