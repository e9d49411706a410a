"""The PostgreSQL source on a real server: filter semantics like SQLite's, JSONB documents as typed
columns, one snapshot per export, early close releases the server, the CSV fast path writes what
the Python writer writes, and discovery of wide and nested documents."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import random
import time
import uuid
from decimal import Decimal

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import sources.postgres as postgres_source
from dataport.errors import UserErrors
from dataport.net import free_port
from formats.csv import CsvWriter, guard
from sources.base import Column, Dataset, SourceError, TransientSourceError
from sources.postgres import INLINE_FIELDS, POSTGRES, PostgresSource, TableInfo, column_sql_for, discover_columns
from sources.query import build_query
from sources.sql import compile_query

# The rows of tests/test_query.py, once as table columns and once as JSONB documents.
ROWS = [
    (1, "alpha", 1.5, True, "2020-01-01", "2020-01-01T10:00:00Z", "x"),
    (2, "beta", None, False, "2021-05-05", "2021-05-05T00:00:00Z", None),
    (3, "Alphabet", 3.0, None, None, None, "y"),
    (4, "gamma", -2.0, True, "2019-07-07", "2019-07-07T23:59:59Z", "z"),
    (5, None, 1.5, False, "2020-01-01", "2020-01-01T09:00:00Z", "w"),
]
FIELDS = ("name", "score", "active", "born", "seen_at", "notes")
TYPES = {
    "id": "integer",
    "name": "string",
    "score": "float",
    "active": "boolean",
    "born": "date",
    "seen_at": "datetime",
    "notes": "string",
}


def _url(postgres_db: str, **extra: str) -> str:
    return make_conninfo(**{**conninfo_to_dict(postgres_db), **extra})


@pytest.fixture(scope="module")
def tables(postgres_db: str):
    """Two datasets over the same rows: ``plain`` (typed table columns) and ``docs`` (JSONB)."""
    plain, docs = f"plain_{uuid.uuid4().hex[:8]}", f"docs_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {plain} (id int PRIMARY KEY, name text, score double precision, "
            f"active boolean, born date, seen_at timestamptz, notes text)"
        )
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {plain} VALUES (%s, %s, %s, %s, %s, %s, %s)", ROWS)
        conn.execute(f"CREATE TABLE {docs} (id int PRIMARY KEY, data jsonb)")
        with conn.cursor() as cur:
            for row in ROWS:
                # a missing key and an explicit null must mean the same: row 3 omits, row 2 says null
                doc = {k: v for k, v in zip(FIELDS, row[1:], strict=True) if v is not None or row[0] == 2}
                cur.execute(f"INSERT INTO {docs} VALUES (%s, %s)", (row[0], json.dumps(doc)))
    plain_ds = Dataset(
        name="plain",
        source="postgres",
        url=postgres_db,
        table=plain,
        key=("id",),
        columns=tuple(Column(n, t) for n, t in TYPES.items()),
    )
    docs_ds = Dataset(
        name="docs",
        source="postgres",
        url=postgres_db,
        table=docs,
        key=("id",),
        columns=discover_columns(postgres_db, docs),
    )
    yield {"plain": plain_ds, "docs": docs_ds}
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {plain}, {docs}")


def _name(kind: str, field: str) -> str:
    return field if kind == "plain" or field == "id" else f"data.{field}"


def _renamed(kind: str, items: list[dict] | None) -> list[dict] | None:
    return None if items is None else [{**f, "field": _name(kind, f["field"])} for f in items]


async def _rows(dataset: Dataset, batch_rows: int = 2, **kwargs) -> list[tuple]:
    query = build_query(dataset, **kwargs)
    source = PostgresSource(dataset)
    try:
        return [row async for batch in source.batches(query, batch_rows) for row in batch]
    finally:
        await source.close()


async def _ids(dataset: Dataset, kind: str, filters=None, sort=None, limit=None) -> list[int]:
    rows = await _rows(dataset, columns=["id"], filters=_renamed(kind, filters), sort=_renamed(kind, sort), limit=limit)
    return [r[0] for r in rows]


def test_discovered_document_columns_have_the_row_types(tables):
    assert {c.name: c.type for c in tables["docs"].columns} == {
        "id": "integer",
        **{f"data.{n}": TYPES[n] for n in FIELDS},
    }


FILTER_CASES = [
    ([{"field": "score", "op": "EQ", "value": 1.5}], [1, 5]),
    ([{"field": "score", "op": "NE", "value": 1.5}], [2, 3, 4]),  # NE keeps nulls
    ([{"field": "score", "op": "GT", "value": 1.5}], [3]),
    ([{"field": "score", "op": "GTE", "value": "1.5"}], [1, 3, 5]),
    ([{"field": "score", "op": "LT", "value": 0}], [4]),
    ([{"field": "score", "op": "LTE", "value": -2}], [4]),
    ([{"field": "score", "op": "BETWEEN", "values": [0, 2]}], [1, 5]),
    ([{"field": "score", "op": "IN", "values": [3, -2.0]}], [3, 4]),
    ([{"field": "score", "op": "NOT_IN", "values": [1.5]}], [2, 3, 4]),
    ([{"field": "score", "op": "IS_NULL"}], [2]),
    ([{"field": "id", "op": "IN", "values": [2, 4, 9]}], [2, 4]),
    ([{"field": "id", "op": "NOT_IN", "values": [2, 4]}], [1, 3, 5]),
    ([{"field": "id", "op": "BETWEEN", "values": [2, 3]}], [2, 3]),
    ([{"field": "name", "op": "EQ", "value": "beta"}], [2]),
    ([{"field": "name", "op": "NE", "value": "beta"}], [1, 3, 4, 5]),
    ([{"field": "name", "op": "GT", "value": "beta"}], [4]),
    ([{"field": "name", "op": "IN", "values": ["alpha", "gamma"]}], [1, 4]),
    ([{"field": "name", "op": "NOT_IN", "values": ["alpha"]}], [2, 3, 4, 5]),
    ([{"field": "name", "op": "CONTAINS", "value": "pha"}], [1, 3]),
    ([{"field": "name", "op": "CONTAINS", "value": "PHA"}], []),  # case-sensitive
    ([{"field": "name", "op": "CONTAINS", "value": "%"}], []),  # no LIKE wildcards
    ([{"field": "name", "op": "PREFIX", "value": "Alph"}], [3]),  # case-sensitive
    ([{"field": "name", "op": "PREFIX", "value": "_lpha"}], []),
    ([{"field": "name", "op": "IS_NULL"}], [5]),
    ([{"field": "name", "op": "IS_NULL", "value": False}], [1, 2, 3, 4]),
    ([{"field": "active", "op": "EQ", "value": True}], [1, 4]),
    ([{"field": "active", "op": "NE", "value": True}], [2, 3, 5]),
    ([{"field": "active", "op": "IN", "values": [False]}], [2, 5]),
    ([{"field": "active", "op": "IS_NULL"}], [3]),
    ([{"field": "born", "op": "EQ", "value": "2020-01-01"}], [1, 5]),
    ([{"field": "born", "op": "GTE", "value": "2020-01-01"}], [1, 2, 5]),
    ([{"field": "born", "op": "LT", "value": "2020-01-01"}], [4]),
    ([{"field": "born", "op": "NE", "value": "2020-01-01"}], [2, 3, 4]),
    ([{"field": "born", "op": "BETWEEN", "values": ["2019-01-01", "2020-12-31"]}], [1, 4, 5]),
    ([{"field": "seen_at", "op": "LT", "value": "2020-01-01T09:30:00+00:00"}], [4, 5]),
    ([{"field": "seen_at", "op": "LT", "value": "2020-01-01T10:30:00+01:00"}], [4, 5]),  # = 09:30Z
    ([{"field": "seen_at", "op": "EQ", "value": "2020-01-01T10:00:00"}], [1]),  # no offset: UTC
    ([{"field": "seen_at", "op": "GT", "value": "2020-01-01T05:00:00-05:00"}], [2]),  # = 10:00Z
    ([{"field": "seen_at", "op": "IS_NULL"}], [3]),
    ([{"field": "seen_at", "op": "BETWEEN", "values": ["2020-01-01", "2021-01-01"]}], [1, 5]),
    ([{"field": "name", "op": "EQ", "value": "x' OR '1'='1"}], []),  # bound, never spliced
    ([{"field": "name", "op": "IN", "values": ["alpha'); DROP TABLE t; --"]}], []),
    ([{"field": "score", "op": "GT", "value": 0}, {"field": "name", "op": "PREFIX", "value": "a"}], [1]),
]


@pytest.mark.parametrize("kind", ["plain", "docs"])
@pytest.mark.parametrize(("filters", "expected"), FILTER_CASES)
async def test_filters(tables, kind, filters, expected):
    assert await _ids(tables[kind], kind, filters=filters) == expected


@pytest.mark.parametrize("kind", ["plain", "docs"])
async def test_sort_is_stable_with_nulls_last_ascending(tables, kind):
    ds = tables[kind]
    assert await _ids(ds, kind, sort=[{"field": "score"}]) == [4, 1, 5, 3, 2]
    assert await _ids(ds, kind, sort=[{"field": "score", "direction": "DESC"}]) == [2, 3, 1, 5, 4]
    assert await _ids(ds, kind, sort=[{"field": "born", "direction": "DESC"}], limit=2) == [3, 2]
    assert await _ids(ds, kind, sort=[{"field": "seen_at", "direction": "DESC"}]) == [3, 2, 1, 5, 4]
    assert await _ids(ds, kind, sort=[{"field": "active"}, {"field": "name"}]) == [2, 5, 1, 4, 3]


@pytest.mark.parametrize("kind", ["plain", "docs"])
async def test_cells_are_typed_and_counted(tables, kind):
    ds = tables[kind]
    names = ["id", *(_name(kind, f) for f in FIELDS)]
    rows = await _rows(ds, columns=names)
    assert rows == [
        (1, "alpha", 1.5, True, "2020-01-01", "2020-01-01T10:00:00Z", "x"),
        (2, "beta", None, False, "2021-05-05", "2021-05-05T00:00:00Z", None),
        (3, "Alphabet", 3.0, None, None, None, "y"),
        (4, "gamma", -2.0, True, "2019-07-07", "2019-07-07T23:59:59Z", "z"),
        (5, None, 1.5, False, "2020-01-01", "2020-01-01T09:00:00Z", "w"),
    ]
    source = PostgresSource(ds)
    assert await source.count(build_query(ds)) == 5
    assert await source.count(build_query(ds), cap=3) == 3
    assert await source.count(build_query(ds, limit=2)) == 2
    assert await source.count(build_query(ds, filters=[{"field": _name(kind, "score"), "op": "GT", "value": 1}])) == 3


async def test_sorting_by_a_jsonb_time_stamp_sorts_instants_not_text(pg, pg_table, postgres_db):
    table = pg_table("events")
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, data jsonb)")
    stamps = {  # text order differs from time order once offsets differ
        1: "2024-03-01T10:00:00+05:00",  # 05:00Z
        2: "2024-03-01T06:00:00Z",
        3: "2024-03-01T07:30:00.25+02:00",  # 05:30:00.25Z
        4: "2024-02-29T23:00:00-08:00",  # 03-01 07:00Z
        5: None,
        6: "2024-03-01T05:00:00",  # no offset: UTC, ties with 1
    }
    with pg.cursor() as cur:
        for i, stamp in stamps.items():
            cur.execute(
                f"INSERT INTO {table} VALUES (%s, %s)",
                (i, json.dumps({"collected_at": stamp, "n": i} if stamp else {"n": i})),
            )
    ds = Dataset(
        name="events",
        source="postgres",
        url=postgres_db,
        table=table,
        key=("id",),
        columns=discover_columns(postgres_db, table),
    )
    assert ds.column("data.collected_at").type == "datetime"
    rows = await _rows(
        ds, columns=["id", "data.collected_at"], sort=[{"field": "data.collected_at", "direction": "DESC"}]
    )
    assert rows == [
        (5, None),
        (4, "2024-03-01T07:00:00Z"),
        (2, "2024-03-01T06:00:00Z"),
        (3, "2024-03-01T05:30:00.25Z"),
        (1, "2024-03-01T05:00:00Z"),
        (6, "2024-03-01T05:00:00Z"),
    ]
    rows = await _rows(
        ds,
        columns=["id"],
        sort=[{"field": "data.collected_at"}],
        limit=3,
        filters=[{"field": "data.collected_at", "op": "GTE", "value": "2024-03-01T05:00:00Z"}],
    )
    assert rows == [(1,), (6,), (3,)]


async def test_cells_of_every_postgres_type(pg, pg_table, postgres_db):
    table = pg_table("typed")
    pg.execute(f"""CREATE TABLE {table} (id bigint PRIMARY KEY, amount numeric(10, 2), ratio real,
        small smallint, day date, local_ts timestamp, ts timestamptz, flag boolean, ref uuid, tags text[],
        label varchar(20), doc jsonb)""")
    ref = uuid.UUID("12345678-1234-5678-1234-567812345678")
    pg.execute(
        f"INSERT INTO {table} VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            1,
            Decimal("12.50"),
            0.25,
            -3,
            dt.date(2024, 2, 29),
            dt.datetime(2024, 1, 1, 12, 0, 0, 500000),
            dt.datetime(2024, 1, 1, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            True,
            ref,
            ["a", "b,c"],
            "x",
            json.dumps({"nested": {"deep": {"v": 7}}, "list": [1, {"a": 2}], "mixed": 1}),
        ),
    )
    pg.execute(f"INSERT INTO {table} (id, doc) VALUES (2, %s)", (json.dumps({"mixed": "text", "list": []}),))
    columns = discover_columns(postgres_db, table)
    assert {c.name: c.type for c in columns} == {
        "id": "integer",
        "amount": "float",
        "ratio": "float",
        "small": "integer",
        "day": "date",
        "local_ts": "datetime",
        "ts": "datetime",
        "flag": "boolean",
        "ref": "string",
        "tags": "string",
        "label": "string",
        "doc.list": "string",
        "doc.mixed": "string",
        "doc.nested.deep.v": "integer",
    }
    assert columns[0].required and not columns[1].required
    ds = Dataset(name="typed", source="postgres", url=postgres_db, table=table, key=("id",), columns=columns)
    rows = await _rows(ds)
    assert rows[0] == (
        1,
        12.5,
        0.25,
        -3,
        "2024-02-29",
        "2024-01-01T12:00:00.5Z",
        "2024-01-01T10:00:00Z",
        True,
        str(ref),
        '{a,"b,c"}',
        "x",
        '[1, {"a": 2}]',
        "1",
        7,
    )
    assert rows[1] == (2, *([None] * 10), "[]", "text", None)
    assert [type(v) for v in rows[0][:4]] == [int, float, float, int]
    with pytest.MonkeyPatch.context() as patch:  # the same cells when the document is flattened in Python
        patch.setattr("sources.postgres.plans.INLINE_FIELDS", 0)
        patch.setattr("sources.postgres.plans.SMALL_DOCUMENT_BYTES", 0)
        assert await _rows(ds) == rows
    # filters compare in the column's type: a Decimal column against a float, a naive time stamp as UTC
    assert await _rows(ds, columns=["id"], filters=[{"field": "amount", "op": "EQ", "value": 12.5}]) == [(1,)]
    assert await _rows(
        ds, columns=["id"], filters=[{"field": "local_ts", "op": "GT", "value": "2024-01-01T13:00:00+01:00"}]
    ) == [(1,)]
    assert await _rows(ds, columns=["id"], filters=[{"field": "doc.nested.deep.v", "op": "GTE", "value": 7}]) == [(1,)]


async def test_names_come_only_from_the_registry_and_are_quoted(pg, pg_table, postgres_db):
    table = pg_table("odd")
    evil = "a'); DROP TABLE victim; --"
    pg.execute(f'CREATE TABLE {table} (id int PRIMARY KEY, "we""ird %s col" text, "50%" int, data jsonb)')
    pg.execute(
        f"INSERT INTO {table} VALUES (1, 'w', 50, %s), (2, NULL, 7, %s)",
        (json.dumps({evil: "boom", "dotted.key": 1, "%s": "pct"}), json.dumps({evil: "calm"})),
    )
    pg.execute("CREATE TABLE IF NOT EXISTS victim (x int)")
    try:
        columns = discover_columns(postgres_db, table)
        names = [c.name for c in columns]
        assert names == ["id", 'we"ird %s col', "50%", "data.%s", f"data.{evil}"]  # "dotted.key" is ambiguous
        ds = Dataset(name="odd", source="postgres", url=postgres_db, table=table, key=("id",), columns=columns)
        rows = await _rows(
            ds,
            filters=[{"field": f"data.{evil}", "op": "EQ", "value": "boom"}, {"field": "50%", "op": "GT", "value": 8}],
            sort=[{"field": 'we"ird %s col'}],
        )
        assert rows == [(1, "w", 50, "pct", "boom")]
        source = PostgresSource(ds)
        chunks = [
            c async for c in source.csv_batches(build_query(ds, sort=[{"field": "data.%s"}]), 10, formula_guard=True)
        ]
        assert b"".join(c for c, _ in chunks).decode().splitlines()[1:] == ["1,w,50,pct,boom", "2,,7,,calm"]
        assert pg.execute("SELECT to_regclass('victim') IS NOT NULL").fetchone()[0]
        # a name that is not in the registry never reaches SQL
        with pytest.raises(UserErrors) as e:
            build_query(ds, filters=[{"field": "data.a'); DROP TABLE victim; --x", "op": "EQ", "value": 1}])
        assert e.value.errors[0].code == "UNKNOWN_COLUMN"
        # the compiled SQL carries the key as one literal, quotes doubled; values are parameters
        info = TableInfo({"id": "int4", "data": "jsonb"})
        compiled = compile_query(
            build_query(ds, columns=["id"], filters=[{"field": f"data.{evil}", "op": "EQ", "value": "x' OR '1'='1"}]),
            table,
            POSTGRES,
            column_sql=column_sql_for(info),
        )
        assert """(("data"->>'a''); DROP TABLE victim; --') COLLATE "C") = %s""" in compiled.select
        assert "x' OR" not in compiled.select and compiled.params == ("x' OR '1'='1",)
    finally:
        pg.execute("DROP TABLE IF EXISTS victim")


async def test_an_export_reads_one_snapshot(pg, pg_table, postgres_db):
    table = pg_table("snap")
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    pg.execute(f"INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, 10) g")
    ds = Dataset(
        name="snap",
        source="postgres",
        url=postgres_db,
        table=table,
        key=("id",),
        columns=(Column("id", "integer"), Column("v")),
    )
    source = PostgresSource(ds)
    batches = source.batches(build_query(ds, columns=["id"]), 3)
    seen = [r[0] for r in await anext(batches)]
    pg.execute(f"INSERT INTO {table} VALUES (0, 'early'), (100, 'late')")  # committed by another connection
    pg.execute(f"DELETE FROM {table} WHERE id = 9")
    seen += [r[0] async for batch in batches for r in batch]
    assert seen == list(range(1, 11))
    assert await source.count(build_query(ds)) == 11  # the next read sees them


async def _backends(pg: psycopg.Connection, app: str) -> list[tuple]:
    return pg.execute("SELECT pid, state, query FROM pg_stat_activity WHERE application_name = %s", (app,)).fetchall()


async def _gone_within(pg: psycopg.Connection, app: str, seconds: float) -> float:
    started = time.monotonic()
    while await _backends(pg, app):
        assert time.monotonic() - started < seconds, await _backends(pg, app)
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_closing_early_releases_cursor_and_connection(pg, pg_table, postgres_db):
    table = pg_table("big")
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    pg.execute(f"INSERT INTO {table} SELECT g, repeat('x', 50) FROM generate_series(1, 20000) g")
    app = f"dataport-test-{uuid.uuid4().hex[:6]}"
    ds = Dataset(
        name="big",
        source="postgres",
        url=_url(postgres_db, application_name=app),
        table=table,
        key=("id",),
        columns=(Column("id", "integer"), Column("v")),
    )
    source = PostgresSource(ds)
    batches = source.batches(build_query(ds), 100)
    assert len(await anext(batches)) == 100
    ((pid, state, query),) = await _backends(pg, app)
    assert "dataport_" in query  # the named cursor's FETCH
    await batches.aclose()
    await _gone_within(pg, app, 1.0)

    # the CSV fast path, left mid-COPY
    chunks = source.csv_batches(build_query(ds), 100, formula_guard=True)
    await anext(chunks)
    await anext(chunks)
    assert await _backends(pg, app)
    await chunks.aclose()
    await _gone_within(pg, app, 1.0)


async def test_cancelling_a_slow_read_stops_the_statement_within_a_second(pg, pg_table, postgres_db):
    view = pg_table("slow")
    # 10 ms a row: the first batch of 1,000 rows would take 10 s
    pg.execute(
        f"CREATE VIEW {view} AS SELECT g AS id FROM generate_series(1, 100000) g "
        f"WHERE (SELECT g > 0 FROM pg_sleep(0.01 + 0 * g))"
    )
    app = f"dataport-test-{uuid.uuid4().hex[:6]}"
    ds = Dataset(
        name="slow",
        source="postgres",
        url=_url(postgres_db, application_name=app),
        table=view,
        key=("id",),
        columns=(Column("id", "integer"),),
    )
    source = PostgresSource(ds)

    async def read() -> None:
        async for _ in source.batches(build_query(ds), 1000):
            pass

    task = asyncio.create_task(read())
    for _ in range(100):
        await asyncio.sleep(0.05)
        if any(state == "active" for _, state, _ in await _backends(pg, app)):
            break
    else:
        pytest.fail("the read never started")
    task.cancel()
    started = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 1.0
    await _gone_within(pg, app, 1.0)

    # close() from elsewhere (the worker's finally) does the same for a read still in flight
    task = asyncio.create_task(read())
    await asyncio.sleep(0.5)
    await source.close()
    with pytest.raises((SourceError, asyncio.CancelledError)):
        await asyncio.wait_for(task, 2)
    await _gone_within(pg, app, 1.0)


SPECIAL = [
    (1, "plain", 1.5, 10, True, dt.date(2020, 1, 2), "2020-01-02T03:04:05Z"),
    (2, "Zoë Ørsted 東京 🚀", -2.25, -3, False, dt.date(1999, 12, 31), "1999-12-31T23:59:59.123400Z"),
    (3, 'say "hello", world', None, None, None, None, None),
    (4, "line one\nline two\r\nline three", 0.1, 0, True, dt.date(2021, 6, 30), "2021-06-30T00:00:00+02:00"),
    (5, "=SUM(A1:A2)", 1e-7, 2**40, False, dt.date(2000, 2, 29), "2000-02-29T12:00:00.000001Z"),
    (6, "", 12345.678, 7, True, dt.date(2024, 1, 1), "2024-01-01T00:00:00Z"),
    (7, "tab\tinside", 3.0, 1, True, dt.date(2010, 10, 10), "2010-10-10T10:10:10Z"),
    (8, "'=already quoted", 1e22, None, None, None, None),
    (9, "''+two quotes", -0.0, None, None, None, None),
    (10, "-1.5", 123456789.125, None, None, None, None),
    (11, "@home", 2.0**40, None, None, None, None),
    (12, "\tlead tab", 5e-324, None, None, None, None),
    (13, "\rlead cr", -7.0, None, None, None, None),
    (14, "a'=not leading", 0.5, None, None, None, None),
]


def _parsed(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))


async def _both_csvs(ds: Dataset, query, formula_guard: bool) -> tuple[bytes, bytes, list[int]]:
    source = PostgresSource(ds)
    fast = [c async for c in source.csv_batches(query, 5, formula_guard=formula_guard)]
    writer = CsvWriter(query.columns, formula_guard=formula_guard)
    slow = writer.begin() + b"".join([writer.write(b) async for b in source.batches(query, 5)])
    return b"".join(c for c, _ in fast), slow, [n for _, n in fast]


@pytest.mark.parametrize("formula_guard", [True, False])
@pytest.mark.parametrize("kind", ["plain", "docs"])
async def test_csv_fast_path_writes_what_the_python_writer_writes(
    pg, pg_table, postgres_db, kind, formula_guard, monkeypatch
):
    table = pg_table("special")
    if kind == "plain":
        pg.execute(
            f"CREATE TABLE {table} (id int PRIMARY KEY, name text, score double precision, "
            f"count bigint, active boolean, born date, seen_at timestamptz)"
        )
        with pg.cursor() as cur:
            cur.executemany(f"INSERT INTO {table} VALUES (%s, %s, %s, %s, %s, %s, %s)", SPECIAL)
        columns = discover_columns(postgres_db, table)
    else:
        pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, data jsonb)")
        with pg.cursor() as cur:
            for row in SPECIAL:
                doc = dict(zip(("name", "score", "count", "active", "born", "seen_at"), row[1:], strict=True))
                doc["born"] = doc["born"] and doc["born"].isoformat()
                cur.execute(f"INSERT INTO {table} VALUES (%s, %s)", (row[0], json.dumps(doc)))
        columns = discover_columns(postgres_db, table)
    ds = Dataset(name="special", source="postgres", url=postgres_db, table=table, key=("id",), columns=columns)
    query = build_query(ds)
    fast, slow, counts = await _both_csvs(ds, query, formula_guard)
    assert counts[0] == 0 and sum(counts) == len(SPECIAL)
    assert _parsed(fast) == _parsed(slow)
    assert fast == slow  # an empty text cell too: nothing, not "" (a CSV round trip gives the same bytes)
    if formula_guard:
        header = _parsed(fast)[0]
        at = header.index("name" if kind == "plain" else "data.name")
        cells = {row[0]: row[at] for row in _parsed(fast)[1:]}
        assert cells["5"] == "'=SUM(A1:A2)" and cells["8"] == "''=already quoted"
        assert cells["9"] == "'''+two quotes" and cells["10"] == "'-1.5" and cells["11"] == "'@home"
        assert cells["12"] == "'\tlead tab" and cells["13"] == "'\rlead cr" and cells["14"] == "a'=not leading"
        score = header.index("score" if kind == "plain" else "data.score")
        assert _parsed(fast)[10][score] == "123456789.125"  # numbers are never guarded
    if kind == "docs":  # documents flattened in Python type their fields as the SQL casts do
        inline = await _rows(ds, batch_rows=5)
        monkeypatch.setattr("sources.postgres.plans.INLINE_FIELDS", 0)
        monkeypatch.setattr("sources.postgres.plans.SMALL_DOCUMENT_BYTES", 0)
        assert await _rows(ds, batch_rows=5) == inline
        assert (await _both_csvs(ds, query, formula_guard))[1] == slow
        monkeypatch.undo()
    # filters with values in the COPY path (bound client-side by psycopg as literals)
    name = "name" if kind == "plain" else "data.name"
    for value, expected in (("x' OR '1'='1", []), ("%", []), ("'", ["8", "9", "14"]), ("\\", [])):
        q = build_query(ds, columns=["id"], filters=[{"field": name, "op": "CONTAINS", "value": value}])
        fast, slow, _ = await _both_csvs(ds, q, formula_guard)
        assert [r[0] for r in _parsed(fast)[1:]] == expected and fast == slow


def _csv_module_bytes(columns, rows, formula_guard: bool) -> bytes:
    """The rows (as ``batches`` reads them) written by the stdlib csv module cell by cell, with the
    writer's two column rules: the reference for every CSV path."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow([guard(c.name) if formula_guard else c.name for c in columns])
    for row in rows:
        writer.writerow(
            [
                {True: "true", False: "false"}.get(v, v)
                if c.type == "boolean"
                else guard(v)
                if c.type == "string" and formula_guard and v.__class__ is str
                else v
                for c, v in zip(columns, row, strict=True)
            ]
        )
    return buffer.getvalue().encode()


FLOAT_KEYS = [f"f{i:02d}" for i in range(20)]
# Values of float fields beside ordinary ones: exponents, integral numbers (JSON ints), text that
# casts (and "nan"/"inf", which cast to NaN and infinity), nulls.
ODD_FLOATS = [
    1e-07,
    1.5e-05,
    -2.5e-05,
    1e16,
    1e22,
    5e-324,
    -0.0,
    0,
    100,
    -7,
    2**60,
    "1.5",
    " 2.5 ",
    "nan",
    "inf",
    "-Infinity",
    "1e400",
    None,
]


def _odd_document(i: int, rng) -> object:
    if i % 97 == 0:
        return rng.choice([[1, 2], "text", 5, None])  # not an object: every field is empty
    doc: dict = {k: rng.choice(ODD_FLOATS) if rng.random() < 0.2 else rng.uniform(-1e3, 1e3) for k in FLOAT_KEYS}
    for k in rng.sample(FLOAT_KEYS, rng.choice([0, 0, 0, 1, 3])):
        del doc[k]  # missing keys
    if rng.random() < 0.1:
        doc["zz_extra"] = "not a column"
    doc.update(
        n=rng.choice([1, -5, 2**63 - 1, 2**64, None, 3.0, "12"]),
        ok=rng.choice([True, False, None, "yes", "off", 1]),
        s=rng.choice(["plain", "", "=1+2", "'=q", "a,b", 'say "hi"', "line\nfeed", "-1", "日本", None, 5, 2.5]),
        at=rng.choice(["2024-01-01T00:00:00Z", "2024-03-01T07:30:00.25+02:00", "2024-03-01", None]),
        day=rng.choice(["2024-02-29", "2024-02-29T10:00:00Z", None]),
        deep={"x": rng.choice([0.1, 1e-7, 3, None]), "y": {"z": rng.choice(["a", "b,c", None])}},
    )
    return doc


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("formula_guard", [True, False])
async def test_flattened_documents_to_csv_write_what_the_csv_module_writes(
    pg, pg_table, postgres_db, formula_guard, nested, monkeypatch
):
    """Documents flattened in Python go to CSV column-wise (runs of float fields in one orjson call):
    the bytes are those of the csv module over the rows ``batches`` reads. Without nested fields,
    documents are decoded into a Struct of their keys (``_decoder``); with them, into dicts."""
    monkeypatch.setattr("sources.postgres.plans.INLINE_FIELDS", 0)
    monkeypatch.setattr("sources.postgres.plans.SMALL_DOCUMENT_BYTES", 0)
    decoded: list[object] = []
    decoder = postgres_source._decoder

    def counted(groups: list[list[str]], kinds: list[str]):
        decode = decoder(groups, kinds)
        return decode and (lambda text: decoded.append(decode(text)) or decoded[-1])

    monkeypatch.setattr("sources.postgres.plans._decoder", counted)
    rng = random.Random(5)
    table = pg_table("flat")
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text, data jsonb)")
    with pg.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {table} VALUES (%s, %s, %s)",
            [
                (i, rng.choice(["n", "=n", None]), None if i % 89 == 0 else json.dumps(_odd_document(i, rng)))
                for i in range(1, 801)
            ],
        )
    columns = (
        Column("id", "integer"),
        Column("name"),
        Column("data.at", "datetime"),
        Column("data.day", "date"),
        *((Column("data.deep.x", "float"), Column("data.deep.y.z")) if nested else ()),
        *(Column(f"data.{k}", "float") for k in FLOAT_KEYS),
        Column("data.n", "integer"),
        Column("data.ok", "boolean"),
        Column("data.s"),
    )
    ds = Dataset(name="flat", source="postgres", url=postgres_db, table=table, key=("id",), columns=columns)
    source = PostgresSource(ds)
    for query in (
        build_query(ds),
        build_query(
            ds,
            columns=["data.f03", "data.f04", "id", *(f"data.{k}" for k in FLOAT_KEYS[5:])],
            sort=[{"field": "id", "direction": "DESC"}],
        ),
        # fields out of the documents' order: picked one by one rather than sliced
        build_query(ds, columns=["data.f10", "data.f02", "data.f07", "id", "data.f01", "data.f00"]),
    ):
        rows = [r async for b in source.batches(query, 50) for r in b]
        chunks = [c async for c in source.csv_batches(query, 50, formula_guard=formula_guard)]
        assert b"".join(c for c, _ in chunks) == _csv_module_bytes(query.columns, rows, formula_guard)
        assert [n for _, n in chunks][0] == 0 and sum(n for _, n in chunks) == len(rows) == 800
    # the cells are typed as the SQL casts would type them: integral JSON numbers in float fields are
    # floats, text that casts is cast; repr's spelling throughout
    pg.execute(
        f"INSERT INTO {table} VALUES (900, 'x', %s)",
        (
            json.dumps(
                {
                    "f00": 100,
                    "f01": "1.5",
                    "f02": 1e-07,
                    "f03": -0.0,
                    "f04": 1.5e-05,
                    "f05": 1e16,
                    "f06": " -2 ",
                    "f07": 2**60,
                    "n": 3.0,
                    "ok": "yes",
                    "s": "=cmd",
                }
            ),
        ),
    )
    query = build_query(ds, filters=[{"field": "id", "op": "EQ", "value": 900}])
    data = b"".join([c async for c, _ in source.csv_batches(query, 50, formula_guard=formula_guard)])
    cells = dict(zip(*_parsed(data), strict=True))
    assert [cells[f"data.f{i:02d}"] for i in range(8)] == [
        "100.0",
        "1.5",
        "1e-07",
        "0.0",
        "1.5e-05",
        "1e+16",
        "-2.0",
        "1.152921504606847e+18",
    ]  # jsonb has no -0
    assert (cells["data.n"], cells["data.ok"], cells["data.s"]) == ("3", "true", "'=cmd" if formula_guard else "=cmd")
    pg.execute(f"INSERT INTO {table} VALUES (901, 'x', %s)", (json.dumps({k: 7 for k in FLOAT_KEYS}),))
    query = build_query(ds, filters=[{"field": "id", "op": "EQ", "value": 901}])
    data = b"".join([c async for c, _ in source.csv_batches(query, 50, formula_guard=formula_guard)])
    assert {v for k, v in zip(*_parsed(data), strict=True) if k.startswith("data.f")} == {"7.0"}
    # a value that does not cast fails both reads with the same message (row and column)
    pg.execute(f"UPDATE {table} SET data = jsonb_set(data, '{{f07}}', '\"abc\"') WHERE id = 430")
    with pytest.raises(SourceError) as from_rows:
        [r async for b in source.batches(build_query(ds), 50) for r in b]
    with pytest.raises(SourceError) as from_csv:
        [c async for c in source.csv_batches(build_query(ds), 50, formula_guard=True)]
    assert str(from_csv.value) == str(from_rows.value) and "'data.f07' holds 'abc'" in str(from_csv.value)
    # reads without nested fields decode objects through the Struct (typed, or not when a value is of
    # another type); other documents fall back to dicts
    assert None in decoded and {d[1] for d in decoded if d} == {True, False}


async def test_flattened_csv_read_closed_early_releases_the_connection(pg, pg_table, postgres_db, monkeypatch):
    monkeypatch.setattr("sources.postgres.plans.SMALL_DOCUMENT_BYTES", 0)
    table = pg_table("flatclose")
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, data jsonb)")
    pg.execute(
        f"INSERT INTO {table} SELECT g, (SELECT jsonb_object_agg('k' || k, g * k) FROM generate_series(1, 20) k)"
        f" FROM generate_series(1, 5000) g"
    )
    app = f"dataport-test-{uuid.uuid4().hex[:6]}"
    ds = Dataset(
        name="flatclose",
        source="postgres",
        url=_url(postgres_db, application_name=app),
        table=table,
        key=("id",),
        columns=discover_columns(postgres_db, table),
    )
    chunks = PostgresSource(ds).csv_batches(build_query(ds), 100, formula_guard=True)
    assert (await anext(chunks))[1] == 0
    assert (await anext(chunks))[1] == 100
    assert await _backends(pg, app)
    await chunks.aclose()
    await _gone_within(pg, app, 1.0)


async def test_csv_fast_path_header_is_guarded_and_long_names_survive(pg, pg_table, postgres_db):
    table = pg_table("hdr")
    long = "x" * 80
    pg.execute(f'CREATE TABLE {table} (id int PRIMARY KEY, "=cmd" text, "{long[:63]}" int)')
    pg.execute(f"INSERT INTO {table} VALUES (1, '+1', 2)")
    ds = Dataset(
        name="hdr",
        source="postgres",
        url=postgres_db,
        table=table,
        key=("id",),
        columns=discover_columns(postgres_db, table),
    )
    fast, slow, _ = await _both_csvs(ds, build_query(ds), True)
    assert fast == slow == f"id,'=cmd,{long[:63]}\r\n1,'+1,2\r\n".encode()


async def test_csv_fast_path_hands_over_a_slow_copy_as_it_comes(postgres_db):
    """A COPY that trickles in (a slow filter) is handed over as its packets come, not held back
    until a chunk fills: its progress still moves, and the streaming route still streams."""
    statement = (
        "COPY (SELECT g, repeat('x', 1000) FROM generate_series(1, 150) g, LATERAL pg_sleep(0.01 + 0 * g)) "
        "TO STDOUT WITH (FORMAT csv)"
    )  # ~1.5 s; the server sends a packet every ~80 ms
    async with await psycopg.AsyncConnection.connect(postgres_db, autocommit=True) as conn:
        started = time.monotonic()
        arrivals, data = [], []
        async for chunk, rows in postgres_source._copy_chunks(conn, statement, None, 100_000):
            arrivals.append((time.monotonic() - started, rows))
            data.append(chunk)
    assert b"".join(data) == b"".join(f"{g},{'x' * 1000}\r\n".encode() for g in range(1, 151))
    assert sum(rows for _, rows in arrivals) == 150
    assert arrivals[0][0] < 0.6 and len(arrivals) >= 5, arrivals


@pytest.mark.parametrize("flattened", [False, True])
async def test_a_jsonb_value_that_does_not_cast_names_the_column(pg, pg_table, postgres_db, flattened, monkeypatch):
    fields = INLINE_FIELDS + 1 if flattened else 1
    if flattened:  # documents this small are read in SQL unless told otherwise
        monkeypatch.setattr("sources.postgres.plans.SMALL_DOCUMENT_BYTES", 0)
    table = pg_table("badcast")
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, data jsonb)")
    extra = {f"f{i:02d}": i for i in range(fields - 1)}
    with pg.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {table} VALUES (%s, %s)",
            [(i, json.dumps({"au_ppm": i * 0.5, **extra})) for i in range(1, 2000)],
        )
        cur.execute(f"INSERT INTO {table} VALUES (2000, %s)", (json.dumps({"au_ppm": "abc", **extra}),))
    ds = Dataset(
        name="assays",
        source="postgres",
        url=postgres_db,
        table=table,
        key=("id",),
        columns=discover_columns(postgres_db, table),
    )
    assert ds.column("data.au_ppm").type == "float"  # the sample saw numbers; the last row is text
    with pytest.raises(SourceError) as e:
        await _rows(ds, batch_rows=500)
    assert "'data.au_ppm'" in str(e.value) and "'abc'" in str(e.value) and "2000" in str(e.value)
    assert not isinstance(e.value, TransientSourceError)
    # a filter on it fails the same way, the count too
    query = build_query(ds, filters=[{"field": "data.au_ppm", "op": "GT", "value": 1}])
    with pytest.raises(SourceError, match=r"'data\.au_ppm' holds 'abc' in the row with id = 2000"):
        await PostgresSource(ds).count(query)
    with pytest.raises(SourceError, match=r"data\.au_ppm"):
        async for _ in PostgresSource(ds).csv_batches(query, 100, formula_guard=True):
            pass


async def test_wide_jsonb_table_discovers_and_exports(pg, pg_table, postgres_db):
    table = pg_table("wide")
    keys = 2000
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, site text, data jsonb)")
    pg.execute(f"""INSERT INTO {table}
        SELECT i, 'site ' || (i % 7),
               (SELECT jsonb_object_agg('f' || lpad(k::text, 4, '0'), (i * 10000 + k) / 4.0)
                FROM generate_series(1, {keys}) k)
               || jsonb_build_object('taken', (date '2024-01-01' + i)::text)
        FROM generate_series(1, 200) i""")
    started = time.monotonic()
    columns = discover_columns(postgres_db, table)
    assert time.monotonic() - started < 10
    assert len(columns) == 2 + keys + 1 and columns[2].name == "data.f0001" and columns[2].type == "float"
    assert {c.name: c.type for c in columns}["data.taken"] == "date"
    ds = Dataset(name="wide", source="postgres", url=postgres_db, table=table, key=("id",), columns=columns)
    query = build_query(
        ds,
        filters=[{"field": "data.f0002", "op": "GT", "value": 125_000}],
        sort=[{"field": "data.taken", "direction": "DESC"}],
    )
    source = PostgresSource(ds)
    rows = [r async for b in source.batches(query, 2000) for r in b]
    assert [r[0] for r in rows] == list(range(200, 49, -1))
    assert rows[0][:4] == (200, "site 4", 500000.25, 500000.5) and rows[0][-1] == "2024-07-19"
    assert len(rows[0]) == len(columns)
    chunks = [c async for c in source.csv_batches(query, 2000, formula_guard=True)]
    assert sum(n for _, n in chunks) == 151
    parsed = _parsed(b"".join(c for c, _ in chunks))
    assert len(parsed[0]) == len(columns) and parsed[1][:4] == ["200", "site 4", "500000.25", "500000.5"]
    assert await source.count(query) == 151


async def test_errors_say_whether_a_retry_can_help(pg, pg_table, postgres_db):
    ds = Dataset(
        name="gone",
        source="postgres",
        url=postgres_db,
        table="no_such_table",
        key=(),
        columns=(Column("id", "integer"),),
    )
    with pytest.raises(SourceError, match="no_such_table") as e:
        await PostgresSource(ds).count(build_query(ds))
    assert not isinstance(e.value, TransientSourceError)

    table = pg_table("cols")
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    ds = Dataset(
        name="cols",
        source="postgres",
        url=postgres_db,
        table=table,
        key=("id",),
        columns=(Column("id", "integer"), Column("missing")),
    )
    with pytest.raises(SourceError, match="'missing'"):
        await _rows(ds)

    refused = Dataset(
        name="down",
        source="postgres",
        url=f"postgresql://postgres@127.0.0.1:{free_port()}/x",
        table="t",
        columns=(Column("id", "integer"),),
    )
    with pytest.raises(TransientSourceError, match="unavailable"):
        await _rows(refused)
    with pytest.raises(SourceError):
        discover_columns(refused.url, "t")
    with pytest.raises(SourceError, match="not found"):
        discover_columns(postgres_db, "no_such_table")


async def test_float_text_of_the_fast_path_is_pythons_repr(pg, pg_table, postgres_db):
    table = pg_table("floats")
    values = [
        0.0,
        -0.0,
        3.0,
        -2.5,
        0.1,
        1 / 3,
        1e-7,
        5e-324,
        123456789.125,
        1e15,
        2.0**53,
        9999999999999998.0,
        1e16,
        1e22,
        -1.7976931348623157e308,
    ]
    pg.execute(
        f"CREATE TABLE {table} (id int PRIMARY KEY, f8 double precision, f4 real, n numeric, ts timestamp, day date)"
    )
    with pg.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {table} VALUES (%s, %s, %s, %s, %s, %s)",
            [
                (
                    i,
                    v,
                    v if v == 0 or 1e-30 < abs(v) < 1e30 else None,
                    Decimal(repr(v)),
                    dt.datetime(2020, 1, 1, 0, 0, 0, i * 10) if i else None,
                    dt.date(2020, 1, 1 + i),
                )
                for i, v in enumerate(values)
            ],
        )
    ds = Dataset(
        name="floats",
        source="postgres",
        url=postgres_db,
        table=table,
        key=("id",),
        columns=discover_columns(postgres_db, table),
    )
    fast, slow, _ = await _both_csvs(ds, build_query(ds), True)
    assert fast == slow
    assert _parsed(fast)[2][1:4] == ["-0.0", "-0.0", "0.0"] and _parsed(fast)[11][1] == "9007199254740992.0"
    assert _parsed(fast)[2][4] == "2020-01-01T00:00:00.00001Z"


async def test_text_compares_in_code_point_order_whatever_the_collation(pg, pg_table, postgres_db):
    table = pg_table("coll")
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, s text, data jsonb)")
    for collation in ("und-x-icu", "en-x-icu", "en_US.utf8"):  # a linguistic one: 'a' < 'B'
        try:
            pg.execute(f'ALTER TABLE {table} ALTER COLUMN s TYPE text COLLATE "{collation}"')
            break
        except psycopg.Error:
            continue
    texts = ["b", "A", "a", "B", "Ø", "z"]
    with pg.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {table} VALUES (%s, %s, %s)", [(i, t, json.dumps({"s": t})) for i, t in enumerate(texts)]
        )
    ds = Dataset(
        name="coll",
        source="postgres",
        url=postgres_db,
        table=table,
        key=("id",),
        columns=discover_columns(postgres_db, table),
    )
    for name in ("s", "data.s"):
        rows = await _rows(ds, columns=[name], sort=[{"field": name}])
        assert [r[0] for r in rows] == sorted(texts)
        rows = await _rows(ds, columns=[name], filters=[{"field": name, "op": "GT", "value": "Z"}])
        assert sorted(r[0] for r in rows) == ["a", "b", "z", "Ø"]


async def _csv(source: PostgresSource, query, batch_rows: int = 100) -> tuple[bytes, list[int]]:
    chunks = [c async for c in source.csv_batches(query, batch_rows, formula_guard=True)]
    return b"".join(c for c, _ in chunks), [n for _, n in chunks]


async def test_a_large_table_is_copied_by_key_ranges_on_two_connections_in_one_snapshot(
    pg, pg_table, postgres_db, monkeypatch
):
    table = pg_table("ranges")
    pg.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, name text, score double precision, ok boolean)")
    pg.execute(
        f"INSERT INTO {table} SELECT g * 3, CASE WHEN g % 7 = 0 THEN '=f' || g ELSE 'n' || g END, g / 4.0, "
        f"g % 2 = 0 FROM generate_series(1, 6000) g"
    )
    app = f"dataport-test-{uuid.uuid4().hex[:6]}"
    ds = Dataset(
        name="ranges",
        source="postgres",
        url=_url(postgres_db, application_name=app),
        table=table,
        key=("id",),
        columns=discover_columns(postgres_db, table),
    )
    queries = [
        build_query(ds),
        build_query(ds, sort=[{"field": "id", "direction": "DESC"}]),
        build_query(
            ds, filters=[{"field": "score", "op": "GT", "value": 100}, {"field": "name", "op": "PREFIX", "value": "n"}]
        ),
    ]
    serial = [await _csv(PostgresSource(ds), q) for q in queries]
    serial_rows = await _rows(ds, batch_rows=100, sort=[{"field": "id", "direction": "DESC"}])
    monkeypatch.setattr("sources.postgres.ranges.SPLIT_BYTES", 0)
    monkeypatch.setattr("sources.postgres.ranges.RANGE_BYTES", 16 * 1024)
    for query, (data, counts) in zip(queries, serial, strict=True):
        source = PostgresSource(ds)
        conn = await source._connect(snapshot=True)
        assert len(await source._key_ranges(conn, query)) > 4
        await source._release(conn)
        parallel, parallel_counts = await _csv(source, query)
        assert parallel == data and parallel_counts[0] == 0 and sum(parallel_counts) == sum(counts)
    # the rows of the other formats too (a server-side cursor per range)
    assert await _rows(ds, batch_rows=100, sort=[{"field": "id", "direction": "DESC"}]) == serial_rows

    # both connections read at once, in the snapshot of the first: later changes are not seen
    source = PostgresSource(ds)
    chunks = source.csv_batches(queries[0], 100, formula_guard=True)
    seen = [await anext(chunks), await anext(chunks)]
    assert len(await _backends(pg, app)) == 2
    pg.execute(f"INSERT INTO {table} VALUES (1, 'early', 0, true), (17999, 'late', 0, true)")
    pg.execute(f"DELETE FROM {table} WHERE id IN (9000, 17997)")
    seen += [c async for c in chunks]
    assert b"".join(c for c, _ in seen) == serial[0][0]
    assert await _gone_within(pg, app, 1.0) < 1.0


async def test_a_server_that_exports_no_snapshot_is_read_on_one_connection(pg, pg_table, postgres_db, monkeypatch):
    """Where ``pg_export_snapshot()`` fails (a standby; here, a user not allowed to call it), a
    large table is read on one connection, in a transaction of its own: the failed call ended
    the first one."""
    table = pg_table("nosnap")
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    pg.execute(f"INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, 3000) g")
    role = f"dp_nosnap_{uuid.uuid4().hex[:8]}"
    pg.execute(f'CREATE ROLE "{role}" LOGIN')
    pg.execute(f'GRANT SELECT ON "{table}" TO "{role}"')
    pg.execute("REVOKE EXECUTE ON FUNCTION pg_export_snapshot() FROM PUBLIC")  # in this session's database
    try:
        ds = Dataset(
            name="nosnap",
            source="postgres",
            url=_url(postgres_db, user=role),
            table=table,
            key=("id",),
            columns=discover_columns(postgres_db, table),
        )
        serial = await _csv(PostgresSource(ds), build_query(ds))
        monkeypatch.setattr("sources.postgres.ranges.SPLIT_BYTES", 0)
        monkeypatch.setattr("sources.postgres.ranges.RANGE_BYTES", 16 * 1024)
        # The same bytes and rows; not the same chunks, which follow what libpq had received.
        data, counts = await _csv(PostgresSource(ds), build_query(ds))
        assert data == serial[0] and sum(counts) == sum(serial[1]) == 3000
        assert await _rows(ds, batch_rows=100) == [(i, f"v{i}") for i in range(1, 3001)]
    finally:
        pg.execute("GRANT EXECUTE ON FUNCTION pg_export_snapshot() TO PUBLIC")
        pg.execute(f'DROP OWNED BY "{role}"')
        pg.execute(f'DROP ROLE "{role}"')


async def test_the_connections_of_a_split_read_ask_for_no_parallel_workers(pg, pg_table, postgres_db, monkeypatch):
    """Two connections already keep two cores busy: a range's COPY is planned without a Gather of
    parallel workers (on 2 cores those cost more CPU and time for the same rows). A read on one
    connection keeps PostgreSQL's own choice. The plans are read on the connection that copies."""
    table = pg_table("noparallel")
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text, x double precision)")
    pg.execute(f"INSERT INTO {table} SELECT g, 'v' || g, g / 3.0 FROM generate_series(1, 20000) g")
    pg.execute(f"ANALYZE {table}")
    # Parallel plans made free, so that the planner picks one wherever it may.
    cheap = " ".join(
        f"-c {name}=0"
        for name in (
            "parallel_setup_cost",
            "parallel_tuple_cost",
            "min_parallel_index_scan_size",
            "min_parallel_table_scan_size",
        )
    )
    ds = Dataset(
        name="noparallel",
        source="postgres",
        url=_url(postgres_db, options=cheap),
        table=table,
        key=("id",),
        columns=discover_columns(postgres_db, table),
    )
    plans: list[str] = []
    copy_chunks = postgres_source._copy_chunks

    async def explained(conn, statement, params, batch_rows):
        select = statement.removeprefix("COPY (").removesuffix(") TO STDOUT WITH (FORMAT csv)")
        cur = await conn.execute("EXPLAIN (FORMAT JSON) " + select, params)
        plans.append(json.dumps((await cur.fetchone())[0]))
        async for item in copy_chunks(conn, statement, params, batch_rows):
            yield item

    monkeypatch.setattr("sources.postgres.source._copy_chunks", explained)
    serial = await _csv(PostgresSource(ds), build_query(ds))
    assert len(plans) == 1 and '"Gather' in plans[0]  # the planner would use workers here
    plans.clear()
    monkeypatch.setattr("sources.postgres.ranges.SPLIT_BYTES", 0)
    monkeypatch.setattr("sources.postgres.ranges.RANGE_BYTES", 64 * 1024)
    assert (await _csv(PostgresSource(ds), build_query(ds)))[0] == serial[0]
    assert len(plans) > 4
    assert not [plan for plan in plans if '"Gather' in plan]


def _split_read_table(pg, pg_table, postgres_db, monkeypatch, name: str) -> tuple[Dataset, str]:
    """A 50,000-row table read by key ranges on two connections (every table is split, in ranges
    of 64 KiB), and the application name that tells its reads' backends apart."""
    monkeypatch.setattr("sources.postgres.ranges.SPLIT_BYTES", 0)
    monkeypatch.setattr("sources.postgres.ranges.RANGE_BYTES", 64 * 1024)
    table = pg_table(name)
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    pg.execute(f"INSERT INTO {table} SELECT g, repeat('x', 50) FROM generate_series(1, 50000) g")
    app = f"dataport-test-{uuid.uuid4().hex[:6]}"
    ds = Dataset(
        name=name,
        source="postgres",
        url=_url(postgres_db, application_name=app),
        table=table,
        key=("id",),
        columns=discover_columns(postgres_db, table),
    )
    return ds, app


@pytest.mark.parametrize("which", ["first", "second"])
async def test_a_connection_of_a_split_read_terminated_mid_read_is_a_transient_error(
    pg, pg_table, postgres_db, monkeypatch, which
):
    """``pg_terminate_backend`` of either connection of a read by key ranges (a restart, a failover,
    an administrator) fails the read as transient, so the worker tries again from a fresh snapshot,
    and leaves no connection behind."""
    ds, app = _split_read_table(pg, pg_table, postgres_db, monkeypatch, "rangekill")
    chunks = PostgresSource(ds).csv_batches(build_query(ds), 100, formula_guard=True)
    await anext(chunks)
    await anext(chunks)
    backends = sorted(pid for pid, _, _ in await _backends(pg, app))
    assert len(backends) == 2
    pg.execute("SELECT pg_terminate_backend(%s)", (backends[0 if which == "first" else 1],))
    with pytest.raises(TransientSourceError):
        async for _ in chunks:
            pass
    await _gone_within(pg, app, 2.0)


async def test_closing_a_read_by_key_ranges_early_releases_every_connection(pg, pg_table, postgres_db, monkeypatch):
    ds, app = _split_read_table(pg, pg_table, postgres_db, monkeypatch, "rangeclose")
    source = PostgresSource(ds)
    chunks = source.csv_batches(build_query(ds), 100, formula_guard=True)
    await anext(chunks)
    await anext(chunks)
    assert len(await _backends(pg, app)) == 2
    await chunks.aclose()
    await _gone_within(pg, app, 1.0)
    batches = source.batches(build_query(ds), 100)
    await anext(batches)
    assert len(await _backends(pg, app)) == 2
    await batches.aclose()
    await _gone_within(pg, app, 1.0)

    # close() from elsewhere (the worker's finally) while both connections read
    async def read() -> None:
        async for _ in source.csv_batches(build_query(ds), 100, formula_guard=True):
            await asyncio.sleep(0.01)

    task = asyncio.create_task(read())
    for _ in range(100):
        await asyncio.sleep(0.05)
        if len(await _backends(pg, app)) == 2:
            break
    await source.close()
    with pytest.raises((SourceError, psycopg.Error, asyncio.CancelledError)):
        await asyncio.wait_for(task, 2)
    await _gone_within(pg, app, 1.0)


def _odd_documents_table(pg: psycopg.Connection, pg_table, name: str, rng: random.Random) -> str:
    """A table of 1,200 rows (id 1-1200, a name that may need the guard, an odd document each)."""
    table = pg_table(name)
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text, data jsonb)")
    with pg.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {table} VALUES (%s, %s, %s)",
            [(i, rng.choice(["n", "=n", None]), json.dumps(_odd_document(i, rng))) for i in range(1, 1201)],
        )
    return table


async def test_helper_processes_flatten_documents_to_the_same_bytes(pg, pg_table, postgres_db, monkeypatch):
    monkeypatch.setattr("sources.postgres.plans.INLINE_FIELDS", 0)
    monkeypatch.setattr("sources.postgres.plans.SMALL_DOCUMENT_BYTES", 0)
    table = _odd_documents_table(pg, pg_table, "helpers", random.Random(7))
    columns = (
        Column("id", "integer"),
        Column("name"),
        Column("data.at", "datetime"),
        Column("data.deep.x", "float"),
        *(Column(f"data.{k}", "float") for k in FLOAT_KEYS),
        Column("data.n", "integer"),
        Column("data.s"),
    )
    app = f"dataport-test-{uuid.uuid4().hex[:6]}"
    ds = Dataset(
        name="helpers",
        source="postgres",
        url=_url(postgres_db, application_name=app),
        table=table,
        key=("id",),
        columns=columns,
    )
    query = build_query(ds)
    in_process = await _csv(PostgresSource(ds), query, 50)
    monkeypatch.setattr("sources.postgres.helper_reads.HELPERS_AFTER_CELLS", 2000)  # from the third batch on
    assert await _csv(PostgresSource(ds), query, 50) == in_process
    # a document that does not cast fails the read with the same message, from a helper
    pg.execute(f"UPDATE {table} SET data = jsonb_set(data, '{{f07}}', '\"abc\"') WHERE id = 1100")
    with pytest.raises(SourceError, match=r"Row 1100: column 'data.f07' holds 'abc'"):
        await _csv(PostgresSource(ds), query, 50)
    await _gone_within(pg, app, 1.0)
    # closed early: the connection goes at once
    chunks = PostgresSource(ds).csv_batches(query, 50, formula_guard=True)
    for _ in range(6):
        await anext(chunks)
    await chunks.aclose()
    await _gone_within(pg, app, 1.0)


async def test_helper_processes_read_and_flatten_the_key_ranges_themselves(pg, pg_table, postgres_db, monkeypatch):
    """A large read of flattened documents by key ranges: each range is read by a helper process on
    a connection of its own, in the read's snapshot, and flattened there, so the documents never
    pass through the worker (which runs no cursor over them). The bytes are those of a read in one
    process; a bad cell names the read's row; no connection outlives the read, however it ends."""
    monkeypatch.setattr("sources.postgres.plans.INLINE_FIELDS", 0)
    monkeypatch.setattr("sources.postgres.plans.SMALL_DOCUMENT_BYTES", 0)
    table = _odd_documents_table(pg, pg_table, "rangehelpers", random.Random(11))
    columns = (
        Column("id", "integer"),
        Column("name"),
        Column("data.at", "datetime"),
        *(Column(f"data.{k}", "float") for k in FLOAT_KEYS),
        Column("data.n", "integer"),
        Column("data.s"),
    )
    app = f"dataport-test-{uuid.uuid4().hex[:6]}"
    ds = Dataset(
        name="rangehelpers",
        source="postgres",
        url=_url(postgres_db, application_name=app),
        table=table,
        key=("id",),
        columns=columns,
    )
    query = build_query(ds)
    in_process, _ = await _csv(PostgresSource(ds), query, 50)  # a small table: one connection, no helpers
    monkeypatch.setattr("sources.postgres.ranges.SPLIT_BYTES", 0)
    monkeypatch.setattr("sources.postgres.ranges.RANGE_BYTES", 16 * 1024)
    source = PostgresSource(ds)
    conn = await source._connect(snapshot=True)
    assert len(await source._key_ranges(conn, query)) > 4
    await source._release(conn)
    cursors: list[str] = []
    cursor_batches = postgres_source._cursor_batches

    def recorded(conn, select, params, size):
        cursors.append(select)
        return cursor_batches(conn, select, params, size)

    monkeypatch.setattr("sources.postgres.source._cursor_batches", recorded)  # in this process only
    data, counts = await _csv(source, query, 50)
    assert data == in_process and counts[0] == 0 and sum(counts) == 1200
    assert cursors == []
    assert await _gone_within(pg, app, 1.0) < 1.0
    # a value that does not cast: the read's row number, not the row's place in its range
    pg.execute(f"UPDATE {table} SET data = jsonb_set(data, '{{f07}}', '\"abc\"') WHERE id = 1100")
    with pytest.raises(SourceError, match=r"^Row 1100: column 'data.f07' holds 'abc'"):
        await _csv(PostgresSource(ds), query, 50)
    await _gone_within(pg, app, 1.0)
    pg.execute(f"UPDATE {table} SET data = jsonb_set(data, '{{f07}}', '1.5') WHERE id = 1100")
    expected, _ = await _csv(PostgresSource(ds), build_query(ds), 50)
    # closed early: the helpers' connections go too
    chunks = PostgresSource(ds).csv_batches(query, 50, formula_guard=True)
    for _ in range(3):
        await anext(chunks)
    await chunks.aclose()
    await _gone_within(pg, app, 1.0)
    # the helpers read in the snapshot of the worker's connection: later changes are not seen
    # (A helper that connects only after the changes imports the snapshot all the same.)
    chunks = PostgresSource(ds).csv_batches(query, 50, formula_guard=True)
    try:
        seen = [await anext(chunks), await anext(chunks)]
        assert len(await _backends(pg, app)) >= 2  # the snapshot's owner and a helper's connection
        pg.execute(f"INSERT INTO {table} VALUES (0, 'early', '{{}}'), (5000, 'late', '{{}}')")
        pg.execute(f"DELETE FROM {table} WHERE id IN (600, 1199)")
        seen += [c async for c in chunks]
    finally:
        await chunks.aclose()  # a failed check must not leave the table locked for the fixture's DROP
    assert b"".join(c for c, _ in seen) == expected
    assert await _gone_within(pg, app, 1.0) < 1.0


async def test_date_times_are_rendered_as_before_at_every_edge(pg, pg_table, postgres_db):
    """Date-times of years 1-9999 are rendered from their date and time of day (cheaper); the text
    must be the reshaped ISO text as before, and BC, infinite and five-digit years keep that."""
    table = pg_table("edges")
    pg.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, tz timestamptz, ts timestamp)")
    values = [
        "2020-01-02 03:04:05",
        "2020-01-02 03:04:05.1",
        "1999-12-31 23:59:59.123456",
        "2000-02-29 00:00:00.000001",
        "0001-01-01 00:00:00",
        "9999-12-31 23:59:59.999999",
        "10000-01-01 00:00:00",
        "0044-03-15 12:00:00 BC",
        "infinity",
        "-infinity",
        None,
    ]
    with pg.cursor() as cur:
        cur.execute("SET TimeZone = 'Europe/Paris'")  # the source reads in UTC whatever the writer's zone
        cur.executemany(
            f"INSERT INTO {table} VALUES (%s, %s::timestamptz, %s::timestamp)",
            [(i, v, v) for i, v in enumerate(values)],
        )
        cur.execute("SET TimeZone = 'UTC'")
    expected = pg.execute(
        f"SELECT id, CASE WHEN isfinite(tz) THEN replace(left(tz::text, -3), ' ', 'T') || 'Z' ELSE tz::text END, "
        f"CASE WHEN isfinite(ts) THEN replace(ts::text, ' ', 'T') || 'Z' ELSE ts::text END FROM {table} ORDER BY id"
    ).fetchall()
    ds = Dataset(
        name="edges",
        source="postgres",
        url=postgres_db,
        table=table,
        key=("id",),
        columns=discover_columns(postgres_db, table),
    )
    fast, slow, _ = await _both_csvs(ds, build_query(ds), True)
    assert fast == slow
    assert _parsed(fast)[1:] == [[str(i), tz or "", ts or ""] for i, tz, ts in expected]
