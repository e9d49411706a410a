"""Rows of several tenants, loaded the same into SQLite, PostgreSQL and OpenSearch, for the tenant
scope tests (tests/test_tenant_scope*.py).

Each row has an integer tenant (``org``, sometimes NULL: such a row is nobody's) and a text one
(``team``, with a quote-and-OR value among them, so a spliced value would show). PostgreSQL also
keeps a JSONB document per row (``data``: the tenant again, and a few fields), for the reads that
flatten documents in Python and in helper processes.
"""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
from opensearchpy import OpenSearch, helpers

from sources.base import Column, Dataset, Scope

TEAMS = ["acme", "globex", "initech", "x' OR '1'='1", "Acme"]
ORGS = [1, 2, 3, 4, 5]
ROW_COUNT = 1200
# The columns every store has, in this order (``org`` need not be filterable to scope by it).
COLUMNS = (
    Column("id", "integer"),
    Column("org", "integer", filterable=False),
    Column("team"),
    Column("name"),
    Column("score", "float"),
    Column("flag", "boolean"),
    Column("day", "date"),
)
ORG, TEAM = 1, 2  # places in a row


def make_rows(seed: int = 5, count: int = ROW_COUNT) -> list[tuple]:
    rnd = random.Random(seed)

    def maybe(value: Any, p: float = 0.1) -> Any:
        return None if rnd.random() < p else value

    return [
        (
            i,
            maybe(rnd.choice(ORGS), 0.05),
            maybe(rnd.choice(TEAMS), 0.05),
            maybe(rnd.choice(["a", "ab", "b", "ba", "abc", "", "Z"])),
            maybe(rnd.choice([-1.5, 0.0, 0.5, 2.0, 10.0])),
            maybe(rnd.random() < 0.5),
            maybe(f"2024-01-{rnd.randint(1, 28):02d}"),
        )
        for i in range(1, count + 1)
    ]


ROWS = make_rows()


def dataset(source: str, url: str, table: str, scope: str = "org", columns: tuple[Column, ...] = COLUMNS,
            claim: str = "org") -> Dataset:  # fmt: skip
    """The rows as a dataset scoped by ``scope`` (a column name; "" for no scope)."""
    return Dataset(
        name=f"tenants_{source}",
        source=source,
        url=url,
        table=table,
        columns=columns,
        key=("id",),
        scope=Scope(column=scope, claim=claim) if scope else None,
    )


def document(row: tuple) -> dict[str, Any]:
    """The JSONB document of a row in PostgreSQL: its tenant, and a few fields of its own."""
    return {"org": row[ORG], "n": row[0] % 7, "s": f"s{row[0] % 3}", "f": row[0] / 8}


def load_sqlite(path: Path, table: str, rows: list[tuple] = ROWS) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(
            f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, org INTEGER, team TEXT, name TEXT, score REAL, "
            f"flag INTEGER, day TEXT)"
        )
        conn.executemany(f"INSERT INTO {table} VALUES (?,?,?,?,?,?,?)", rows)
    conn.close()


def load_postgres(url: str, table: str, rows: list[tuple] = ROWS) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {table} (id integer PRIMARY KEY, org integer, team text, name text, "
            f"score double precision, flag boolean, day date, data jsonb)"
        )
        with conn.cursor().copy(f"COPY {table} FROM STDIN") as copy:
            for row in rows:
                copy.write_row((*row, json.dumps(document(row))))
        conn.execute(f"ANALYZE {table}")


MAPPING = {
    "properties": {
        "id": {"type": "long"},
        "org": {"type": "long"},
        "team": {"type": "keyword"},
        "name": {"type": "keyword"},
        "score": {"type": "double"},
        "flag": {"type": "boolean"},
        "day": {"type": "date", "format": "yyyy-MM-dd"},
    }
}


def load_opensearch(url: str, index: str, rows: list[tuple] = ROWS, mapping: dict | None = None) -> None:
    client = OpenSearch(hosts=[url])
    try:
        client.indices.create(index=index, body={"mappings": mapping or MAPPING})
        helpers.bulk(
            client,
            (
                {
                    "_index": index,
                    "_id": str(row[0]),
                    "_source": {c.name: v for c, v in zip(COLUMNS, row, strict=True) if v is not None},
                }
                for row in rows
            ),
            refresh=True,
        )
    finally:
        client.close()


def drop_opensearch(url: str, index: str) -> None:
    client = OpenSearch(hosts=[url])
    try:
        client.indices.delete(index=index, ignore_unavailable=True)
    finally:
        client.close()


def owned(tenant: Any, at: int = ORG, rows: list[tuple] = ROWS) -> list[tuple]:
    """The rows whose column ``at`` equals ``tenant``, in key order."""
    return [r for r in rows if r[at] is not None and r[at] == tenant]
