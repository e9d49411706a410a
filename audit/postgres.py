"""The audit log in a PostgreSQL table (``DATAPORT_AUDIT_URL``, ``DATAPORT_AUDIT_TABLE``).

``append`` runs in one transaction that first takes a transaction-scoped advisory lock named after
the table: drains on several workers (or hosts) extend the chain one after the other, never from
the same head. The ``id`` column is UNIQUE, so even a writer that bypassed the lock could not store
a record twice.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg

from audit import sql
from audit.base import Filters, Page
from audit.chain import GENESIS, seal_all
from audit.records import AuditRecord, Pending

_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,50}$")


class PostgresAuditStore:
    name = "postgres"

    def __init__(self, url: str, table: str = "dataport_audit"):
        if not _NAME.match(table):
            raise ValueError(f"DATAPORT_AUDIT_TABLE must be a plain lower-case SQL name, not {table!r}")
        self.url = url
        self.table = table
        self._conn: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> psycopg.AsyncConnection[tuple[Any, ...]]:
        if self._conn is None or self._conn.closed:
            conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
            async with conn.transaction():
                # Two processes creating the table at once would collide on its catalog rows.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [self.table])
                for statement in sql.create_table(self.table, "BIGINT"):
                    await conn.execute(statement)
            self._conn = conn
        return self._conn

    async def _fetch(self, query: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        async with self._lock:
            conn = await self._connection()
            cursor = await conn.execute(query, params)
            return await cursor.fetchall()

    async def append(self, records: Sequence[Pending]) -> int:
        if not records:
            return 0
        t = self.table
        async with self._lock:
            conn = await self._connection()
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [t])
                cursor = await conn.execute(f"SELECT id FROM {t} WHERE id = ANY(%s)", [[r.id for r in records]])
                fresh = sql.fresh(records, {row[0] for row in await cursor.fetchall()})
                if not fresh:
                    return 0
                cursor = await conn.execute(f"SELECT seq, hash FROM {t} ORDER BY seq DESC LIMIT 1")
                head = await cursor.fetchone()
                if head is None:
                    cursor = await conn.execute(f"SELECT seq, hash FROM {t}_anchor")
                    head = await cursor.fetchone() or (0, GENESIS)
                sealed = seal_all(int(head[0]) + 1, str(head[1]), fresh)
                async with conn.cursor() as cur:
                    await cur.executemany(sql.insert(t, "%s"), [sql.to_row(r) for r in sealed])
                return len(fresh)

    async def scan(self, filters: Filters | None = None) -> AsyncIterator[AuditRecord]:
        async for record in sql.scan(self._fetch, self.table, filters, "%s"):
            yield record

    async def page(self, filters: Filters, first: int, before_seq: int | None = None) -> Page:
        return await sql.page(self._fetch, self.table, filters, "%s", first, before_seq)

    async def anchor(self) -> str:
        rows = await self._fetch(f"SELECT hash FROM {self.table}_anchor", [])
        return str(rows[0][0]) if rows else GENESIS

    async def prune(self, before: str) -> int:
        t = self.table
        async with self._lock:
            conn = await self._connection()
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [t])
                cursor = await conn.execute(
                    f"SELECT seq, hash FROM {t} WHERE at < %s ORDER BY seq DESC LIMIT 1",
                    [before],
                )
                last = await cursor.fetchone()
                if last is None:
                    return 0
                cursor = await conn.execute(f"DELETE FROM {t} WHERE seq <= %s", [last[0]])
                await conn.execute(
                    f"INSERT INTO {t}_anchor (one, hash, seq) VALUES (1, %s, %s) "
                    "ON CONFLICT (one) DO UPDATE SET hash = excluded.hash, seq = excluded.seq",
                    [last[1], last[0]],
                )
                return cursor.rowcount

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
