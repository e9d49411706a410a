"""The table's columns: as PostgreSQL has them for a read (``TableInfo``, read once per source),
and as a dataset declares them when discovered at start-up (``discover_columns``: each JSONB
column replaced by its fields, typed from a sample of documents).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from sources.base import Column, Dataset, SourceError
from sources.postgres.dialect import _PG_TYPES, _SESSION, CONNECT_TIMEOUT_SECONDS, quote_ident, quote_literal

log = logging.getLogger("dataport.postgres")

# Depth of nested JSONB objects that discovery flattens.
_MAX_DEPTH = 8
_DISCOVERY_SAMPLE = 1000
_DISCOVERY_VALUES = 300_000


@dataclass(frozen=True)
class TableInfo:
    """The table's columns as PostgreSQL has them: base type name per column, in table order."""

    types: dict[str, str]
    not_null: frozenset[str] = frozenset()
    document_bytes: dict[str, float] = field(default_factory=dict)  # average stored size per JSONB column

    @property
    def documents(self) -> frozenset[str]:
        return frozenset(n for n, t in self.types.items() if t == "jsonb")


_TABLE_INFO_SQL = """
SELECT a.attname, COALESCE(bt.typname, t.typname), a.attnotnull
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype
WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""


def _regclass_arg(table: str) -> str:
    return '"' + table.replace('"', '""') + '"'


async def read_table_info(conn: psycopg.AsyncConnection, dataset: Dataset) -> TableInfo:
    """The table's columns, their types and NOT NULL, and the average stored size of each JSONB
    column, on ``conn`` (in its transaction)."""
    cur = await conn.execute(_TABLE_INFO_SQL, (_regclass_arg(dataset.table),))
    rows = await cur.fetchall()
    if not rows:
        raise SourceError(f"dataset '{dataset.name}': table '{dataset.table}' does not exist")
    types = {name: kind for name, kind, _ in rows}
    documents = [n for n, kind in types.items() if kind == "jsonb"]
    sizes: dict[str, float] = {}
    if documents:  # pg_column_size reads the stored size: nothing is de-TOASTed
        averages = ", ".join(f"avg(pg_column_size({quote_ident(d)}))" for d in documents)
        cur = await conn.execute(
            f"SELECT {averages} FROM (SELECT * FROM {quote_ident(dataset.table)} LIMIT 100) AS s", ()
        )
        row = await cur.fetchone()
        sizes = {d: float(v) for d, v in zip(documents, row or (), strict=False) if v is not None}
    return TableInfo(types, frozenset(n for n, _, nn in rows if nn), sizes)


_DISCOVER_SQL = """
WITH RECURSIVE sample AS (
    SELECT {doc} AS doc FROM {table} WHERE jsonb_typeof({doc}) = 'object' LIMIT {limit}
), fields(path, value) AS (
    SELECT ARRAY[e.key], e.value FROM sample, jsonb_each(sample.doc) AS e
    UNION ALL
    SELECT f.path || e.key, e.value FROM fields AS f, jsonb_each(f.value) AS e
    WHERE jsonb_typeof(f.value) = 'object' AND cardinality(f.path) < {depth}
)
SELECT path, kind,
       bool_and(strpos(text, '.') = 0) FILTER (WHERE kind = 'number') AS integral,
       bool_and(text ~ '^\\d{{4}}-\\d{{2}}-\\d{{2}}$') FILTER (WHERE kind = 'string') AS dates,
       bool_and(text ~ {datetime_pattern}) FILTER (WHERE kind = 'string') AS datetimes
FROM (SELECT path, jsonb_typeof(value) AS kind, value #>> '{{}}' AS text FROM fields) AS typed
GROUP BY path, kind
"""
_DATETIME_PATTERN = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|z|[+-]\d{2}(:?\d{2})?)?)?$"


def discover_columns(url: str, table: str) -> tuple[Column, ...]:
    """The table's columns, typed; each JSONB column replaced by its fields (``data.a.b``), typed
    from a sample of ``_DISCOVERY_SAMPLE`` documents. Blocking: called once at start-up."""
    params: dict[str, Any] = conninfo_to_dict(url)  # libpq keywords, which connect() takes as **kwargs
    params.setdefault("application_name", "dataport-discovery")
    params.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
    try:
        with psycopg.connect(autocommit=True, **params) as conn:
            conn.execute(f"BEGIN READ ONLY; {_SESSION}")
            rows = conn.execute(_TABLE_INFO_SQL, (_regclass_arg(table),)).fetchall()
            if not rows:
                raise SourceError(f"table '{table}' not found")
            plain = {name for name, _, _ in rows}
            columns: list[Column] = []
            for name, kind, not_null in rows:
                if kind != "jsonb":
                    columns.append(Column(name, _PG_TYPES.get(kind, "string"), required=bool(not_null)))
                    continue
                fields = _discover_document(conn, table, name, plain)
                columns.extend(fields or [Column(name, "string")])
            return tuple(columns)
    except SourceError:
        raise
    except psycopg.Error as e:
        raise SourceError(f"{table}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None


def _discover_document(conn: psycopg.Connection, table: str, doc: str, taken: set[str]) -> list[Column]:
    # Up to _DISCOVERY_SAMPLE documents, fewer when they are wide: about _DISCOVERY_VALUES values
    # in all (at least 100 documents), which keeps 2,897-key documents to about a second.
    row = conn.execute(
        f"SELECT avg((SELECT count(*) FROM jsonb_object_keys(d))) FROM (SELECT {quote_ident(doc)} AS d "
        f"FROM {quote_ident(table)} WHERE jsonb_typeof({quote_ident(doc)}) = 'object' LIMIT 20) AS s",
        (),
    ).fetchone()
    assert row is not None  # an aggregate: one row
    keys = row[0]
    limit = max(100, min(_DISCOVERY_SAMPLE, int(_DISCOVERY_VALUES // max(1.0, float(keys or 1)))))
    statement = _DISCOVER_SQL.format(
        doc=quote_ident(doc),
        table=quote_ident(table),
        limit=limit,
        depth=_MAX_DEPTH,
        datetime_pattern=quote_literal(_DATETIME_PATTERN),
    )
    seen: dict[tuple[str, ...], dict[str, tuple[bool, bool, bool]]] = {}
    for path, kind, integral, dates, datetimes in conn.execute(statement, ()).fetchall():
        seen.setdefault(tuple(path), {})[kind] = (bool(integral), bool(dates), bool(datetimes))
    objects = {p for p, kinds in seen.items() if "object" in kinds}
    columns = []
    for path in sorted(seen):
        kinds = {k: v for k, v in seen[path].items() if k != "null"}
        if path in objects and set(kinds) == {"object"}:
            continue  # its fields are columns of their own
        if any(not key or "." in key for key in path):
            log.warning(
                "table %s, JSONB column %s: key path %r has an empty key or a dot; not a column", table, doc, path
            )
            continue
        name = ".".join((doc, *path))
        if name in taken:
            continue
        columns.append(Column(name, _json_type(kinds)))
    return columns


def _json_type(kinds: dict[str, tuple[bool, bool, bool]]) -> str:
    if set(kinds) == {"number"}:
        return "integer" if kinds["number"][0] else "float"
    if set(kinds) == {"boolean"}:
        return "boolean"
    if set(kinds) == {"string"}:
        _, dates, datetimes = kinds["string"]
        if dates:
            return "date"
        if datetimes:
            return "datetime"
    return "string"
