"""What the two SQL stores share: the columns, a record as a row and back, the filters as a
WHERE clause (with the driver's placeholder: ``?`` for sqlite3, ``%s`` for psycopg), and the reads
(``scan``, ``page``) over a store's own ``fetch``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from audit.base import Filters, Page
from audit.records import Actor, AuditRecord, Pending, dumps, loads

COLUMNS = (
    "seq",
    "id",
    "at",
    "action",
    "actor",
    "roles",
    "address",
    "user_agent",
    "task_id",
    "dataset",
    "detail",
    "prev_hash",
    "hash",
)
SELECT = ", ".join(COLUMNS)
SCAN_BATCH = 1000

Fetch = Callable[[str, list[Any]], Awaitable[Sequence[Sequence[Any]]]]
"""A store's query runner: the rows a query with these parameters returns."""


def create_table(table: str, seq_type: str) -> list[str]:
    """The table and its indexes: ``seq`` orders the chain, ``id`` de-duplicates, the others serve
    the filters of ``auditEvents``."""
    return [
        f"CREATE TABLE IF NOT EXISTS {table} (seq {seq_type} PRIMARY KEY, id TEXT NOT NULL UNIQUE, "
        "at TEXT NOT NULL, action TEXT NOT NULL, actor TEXT, roles TEXT NOT NULL, address TEXT, user_agent TEXT, "
        "task_id TEXT, dataset TEXT, detail TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL)",
        f"CREATE INDEX IF NOT EXISTS {table}_at ON {table} (at)",
        f"CREATE INDEX IF NOT EXISTS {table}_task ON {table} (task_id, seq)",
        f"CREATE INDEX IF NOT EXISTS {table}_actor ON {table} (actor, seq)",
        f"CREATE INDEX IF NOT EXISTS {table}_dataset ON {table} (dataset, seq)",
        f"CREATE TABLE IF NOT EXISTS {table}_anchor (one INTEGER PRIMARY KEY CHECK (one = 1), "
        "hash TEXT NOT NULL, seq BIGINT NOT NULL)",
    ]


def to_row(record: AuditRecord) -> tuple[Any, ...]:
    p = record.pending
    return (
        record.seq,
        p.id,
        p.at,
        p.action,
        p.actor.user,
        dumps(sorted(p.actor.roles)),
        p.actor.address,
        p.actor.user_agent,
        p.task_id,
        p.dataset,
        dumps(p.detail),
        record.prev_hash,
        record.hash,
    )


def from_row(row: Sequence[Any]) -> AuditRecord:
    seq, record_id, at, action, user, roles, address, agent, task_id, dataset, detail, prev_hash, hashed = row
    actor = Actor(user, tuple(loads(roles) or ()), address, agent)
    return AuditRecord(
        int(seq), Pending(record_id, at, action, actor, task_id, dataset, loads(detail) or {}), prev_hash, hashed
    )


def where(filters: Filters | None, mark: str, before_seq: int | None = None) -> tuple[str, list[Any]]:
    """`` WHERE …`` (or nothing) and its parameters."""
    clauses: list[str] = []
    params: list[Any] = []
    f = filters or Filters()
    for column, value, op in (
        ("task_id", f.task_id, "="),
        ("dataset", f.dataset, "="),
        ("actor", f.actor, "="),
        ("action", f.action, "="),
        ("at", f.since, ">="),
        ("at", f.until, "<"),
        ("seq", before_seq, "<"),
    ):
        if value is not None:
            clauses.append(f"{column} {op} {mark}")
            params.append(value)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def insert(table: str, mark: str) -> str:
    """The INSERT of one row (``to_row``)."""
    return f"INSERT INTO {table} ({SELECT}) VALUES ({','.join([mark] * len(COLUMNS))})"


def fresh(records: Sequence[Pending], known: set[str]) -> list[Pending]:
    """The records to store: not ``known`` to the table, and each id once even if a batch repeats it."""
    taken = set(known)
    kept = []
    for record in records:
        if record.id not in taken:
            kept.append(record)
            taken.add(record.id)
    return kept


async def scan(fetch: Fetch, table: str, filters: Filters | None, mark: str) -> AsyncIterator[AuditRecord]:
    """Every record the filters take, oldest first, ``SCAN_BATCH`` rows a query."""
    after = -1
    while True:
        clause, params = where(filters, mark)
        clause += (" AND" if clause else " WHERE") + f" seq > {mark}"
        query = f"SELECT {SELECT} FROM {table}{clause} ORDER BY seq LIMIT {SCAN_BATCH}"
        rows = await fetch(query, [*params, after])
        for row in rows:
            yield from_row(row)
        if len(rows) < SCAN_BATCH:
            return
        after = rows[-1][0]


async def page(
    fetch: Fetch, table: str, filters: Filters, mark: str, first: int, before_seq: int | None = None
) -> Page:
    """The newest ``first`` records the filters take (before ``before_seq``), and whether there are more."""
    clause, params = where(filters, mark, before_seq)
    query = f"SELECT {SELECT} FROM {table}{clause} ORDER BY seq DESC LIMIT {int(first) + 1}"
    rows = await fetch(query, params)
    return Page([from_row(r) for r in rows[:first]], len(rows) > first)
