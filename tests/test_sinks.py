"""The write side of the sources, on real servers: rows written by a sink read back through the
store's source as exactly the values written; UPSERT updates and inserts; INSERT of an existing key
fails whole; rollback, cancellation and a killed process leave SQL tables as they were; OpenSearch
re-runs converge."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any

import psycopg
import pytest
from opensearchpy import OpenSearch
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dataport.net import free_port
from dataport.settings import Settings
from formats.column_checker import PLAIN_FLOAT_TEXT, text_form
from sources.base import Column, Dataset
from sources.opensearch import OpenSearchSource
from sources.postgres import PostgresSource
from sources.query import build_query
from sources.receipts import Receipt, find_receipt
from sources.sink_base import DuplicateKeyError, SinkError
from sources.sinks import open_sink
from sources.sqlite import SqliteSource
from tests.test_opensearch import FAST, FaultyProxy

ROOT = Path(__file__).resolve().parent.parent

COLUMNS = (
    Column("id", "integer"),
    Column("name", "string"),
    Column("score", "float"),
    Column("active", "boolean"),
    Column("born", "date"),
    Column("seen_at", "datetime"),
    Column("notes", "string"),
)
# Every cell type, None, the empty text, unicode, characters COPY and CSV escape, fractions of seconds.
ROWS = [
    (1, "alpha", 1.5, True, "2020-01-01", "2020-01-01T10:00:00Z", "x"),
    (2, "Zoë 招远 ✓ Ørsted", None, False, "2021-05-05", "2021-05-05T00:00:00.5Z", None),
    (3, 'quote " comma, tab\t newline\n backslash \\ \\N', 0.1 + 0.2, None, None, None, ""),
    (4, "=SUM(A1:A9)", 1e300, True, "1999-12-31", "2019-07-07T23:59:59.123456Z", "line\r\nbreak"),
    (5, None, 3.0, False, "2020-02-29", "2020-01-01T09:00:00.25Z", "  padded  "),
    (2**53 + 1, "big id", -2.5e-7, True, "0001-01-01", "1970-01-01T00:00:00.001Z", "🙂"),
]
IDS = sorted(r[0] for r in ROWS)


# -- one harness per store ---------------------------------------------------------------------


class Store:
    """Makes empty targets of one store (a table, an index) and reads them back through its source."""

    name = ""

    def make(
        self, key: tuple[str, ...] = ("id",), columns: tuple[Column, ...] = COLUMNS, unique: bool = True
    ) -> Dataset:
        raise NotImplementedError

    async def read(self, dataset: Dataset) -> list[tuple]:
        source = {"sqlite": SqliteSource, "postgres": PostgresSource, "opensearch": OpenSearchSource}[dataset.source]
        s = source(dataset) if dataset.source == "sqlite" else source(dataset, None)
        try:
            return [row async for batch in s.batches(build_query(dataset), 1000) for row in batch]
        finally:
            await s.close()


class SqliteStore(Store):
    name = "sqlite"
    TYPES = {"integer": "INTEGER", "float": "REAL", "boolean": "BOOLEAN", "date": "DATE", "datetime": "DATETIME"}

    def __init__(self, directory: Path, journal: str = "wal"):
        self.directory, self.journal = directory, journal

    def make(self, key=("id",), columns=COLUMNS, unique=True):
        path = self.directory / f"{uuid.uuid4().hex[:8]}.sqlite3"
        cols = []
        for c in columns:
            sql = f'"{c.name}" {self.TYPES.get(c.type, "TEXT")}'
            if unique and key == (c.name,):
                sql += " PRIMARY KEY"
            cols.append(sql)
        if unique and len(key) > 1:
            cols.append(f"PRIMARY KEY ({', '.join(key)})")
        con = sqlite3.connect(path, isolation_level=None)
        con.execute(f"PRAGMA journal_mode={self.journal}")
        con.execute(f"CREATE TABLE t ({', '.join(cols)})")
        con.close()
        return Dataset(name="things", source="sqlite", url=str(path), table="t", columns=columns, key=key)


class PostgresStore(Store):
    name = "postgres"
    TYPES = {
        "integer": "bigint",
        "float": "double precision",
        "boolean": "boolean",
        "date": "date",
        "datetime": "timestamptz",
        "string": "text",
    }

    def __init__(self, url: str, pg: psycopg.Connection, fresh: Callable[[str], str]):
        self.pg, self.fresh = pg, fresh
        # our own application_name: the tests look for the sink's session in pg_stat_activity
        self.app = f"sinktest_{uuid.uuid4().hex[:8]}"
        self.url = make_conninfo(**{**conninfo_to_dict(url), "application_name": self.app})

    def make(self, key=("id",), columns=COLUMNS, unique=True):
        table = self.fresh("sink")
        cols = [f'"{c.name}" {self.TYPES[c.type]}' for c in columns]
        if unique and key:
            cols.append(f"PRIMARY KEY ({', '.join(key)})")
        self.pg.execute(f'CREATE TABLE "{table}" ({", ".join(cols)})')
        return Dataset(name="things", source="postgres", url=self.url, table=table, columns=columns, key=key)

    def sessions(self) -> list[str]:
        return [
            s
            for (s,) in self.pg.execute(
                "SELECT state FROM pg_stat_activity WHERE application_name = %s", (self.app,)
            ).fetchall()
        ]

    def no_sessions_left(self) -> bool:
        """True once the sinks' sessions are gone (a closed connection's backend exits a moment later)."""
        for _ in range(50):
            if not self.sessions():
                return True
            time.sleep(0.05)
        return False


class OpenSearchStore(Store):
    name = "opensearch"
    TYPES = {
        "integer": "long",
        "float": "double",
        "boolean": "boolean",
        "date": "date",
        "datetime": "date",
        "string": "keyword",
    }

    def __init__(self, url: str):
        self.url = url
        self.client = OpenSearch(hosts=[url])
        self.created: list[str] = []

    def make(self, key=("id",), columns=COLUMNS, unique=True):
        index = f"dp-sink-{uuid.uuid4().hex[:8]}"
        properties: dict[str, Any] = {}
        for c in columns:
            place = properties
            *parents, leaf = c.name.split(".")
            for part in parents:
                place = place.setdefault(part, {"properties": {}})["properties"]
            place[leaf] = {"type": self.TYPES[c.type]} | ({"format": "yyyy-MM-dd"} if c.type == "date" else {})
        self.client.indices.create(index=index, body={"mappings": {"properties": properties}})
        self.created.append(index)
        return Dataset(name="things", source="opensearch", url=self.url, table=index, columns=columns, key=key)

    def close(self) -> None:
        for index in self.created:
            self.client.indices.delete(index=index, ignore_unavailable=True)
        self.client.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path)


@pytest.fixture
def postgres_store(postgres_db: str, pg: psycopg.Connection, pg_table) -> Iterator[PostgresStore]:
    store = PostgresStore(postgres_db, pg, pg_table)
    yield store
    assert store.no_sessions_left(), store.sessions()  # no test leaves a sink's session behind


@pytest.fixture
def opensearch_store(opensearch_url: str) -> Iterator[OpenSearchStore]:
    store = OpenSearchStore(opensearch_url)
    yield store
    store.close()


@pytest.fixture(params=["sqlite", "postgres", "opensearch"])
def store(request) -> Store:
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture(params=["sqlite", "postgres"])
def sql_store(request) -> Store:
    return request.getfixturevalue(f"{request.param}_store")


async def _write(dataset: Dataset, rows: list[tuple], mode: str = "INSERT", columns=None, batch: int = 4) -> int:
    sink = await open_sink(dataset, columns or dataset.columns, mode, None)
    try:
        for start in range(0, len(rows), batch):
            await sink.write(rows[start : start + batch])
        return await sink.commit()
    finally:
        await sink.close()


# -- every store -------------------------------------------------------------------------------


async def test_rows_read_back_exactly_as_written(store):
    ds = store.make()
    assert await _write(ds, ROWS) == len(ROWS)
    assert await store.read(ds) == sorted(ROWS)


async def test_upsert_updates_the_imported_columns_and_inserts_new_rows(store):
    ds = store.make()
    await _write(ds, ROWS)
    columns = (ds.column("id"), ds.column("score"), ds.column("notes"))
    changes = [(1, 9.5, None), (3, None, "now noted"), (100, 7.0, "new")]
    assert await _write(ds, changes, "UPSERT", columns, batch=2) == 3
    expected = {r[0]: r for r in ROWS}
    expected[1] = (1, "alpha", 9.5, True, "2020-01-01", "2020-01-01T10:00:00Z", None)
    expected[3] = (*ROWS[2][:2], None, *ROWS[2][3:6], "now noted")
    expected[100] = (100, None, 7.0, None, None, None, "new")
    assert await store.read(ds) == sorted(expected.values())


async def test_upsert_of_a_key_repeated_in_the_file_keeps_the_last_row(store):
    ds = store.make()
    await _write(ds, ROWS[:2])
    rows = [(*ROWS[0][:6], "first"), (*ROWS[0][:6], "second"), (*ROWS[2][:6], "a"), (*ROWS[2][:6], "b")]
    await _write(ds, rows, "UPSERT", batch=10)
    assert [r[6] for r in await store.read(ds)] == ["second", None, "b"]


async def test_upsert_needs_a_key_in_the_dataset_and_in_the_file(store):
    ds = store.make(key=())
    with pytest.raises(SinkError, match="dataset 'things' has no key"):
        await open_sink(ds, ds.columns, "UPSERT", None)
    ds = store.make()
    with pytest.raises(SinkError, match="the file has no column 'id'"):
        await open_sink(ds, ds.columns[1:], "UPSERT", None)


async def test_insert_of_an_existing_key_fails_and_writes_nothing(store):
    ds = store.make()
    await _write(ds, ROWS[:3])
    before = await store.read(ds)
    sink = await open_sink(ds, ds.columns, "INSERT", None)
    try:
        with pytest.raises(DuplicateKeyError) as e:
            await sink.write(ROWS[3:5])  # new rows first
            await sink.write([(2, "other", None, None, None, None, None)])
            await sink.commit()
        assert re.search(
            r"^a row with id=2 already exists in dataset 'things'.*; import in UPSERT mode to update it "
            r"\(row 3\)$",
            str(e.value),
        )
        assert e.value.row == 3
        assert not e.value.transient
    finally:
        await sink.close()
    if store.name == "opensearch":  # no transactions: the new rows stay, the existing one is untouched
        assert await store.read(ds) == sorted(before + ROWS[3:5])
    else:
        assert await store.read(ds) == before


async def test_a_row_without_a_key_value_is_refused(store):
    ds = store.make()
    sink = await open_sink(ds, ds.columns, "INSERT", None)
    try:
        with pytest.raises(SinkError, match="row 3 has no value for the key column 'id'") as e:
            await sink.write(ROWS[:2] + [(None, "x", None, None, None, None, None)])
        assert e.value.row == 3
        with pytest.raises(SinkError, match="an earlier"):  # a failed sink takes no more rows
            await sink.write(ROWS[3:4])
    finally:
        await sink.close()


async def test_a_closed_sink_takes_no_more_rows(store):
    ds = store.make()
    sink = await open_sink(ds, ds.columns, "INSERT", None)
    await sink.write(ROWS[:1])
    assert await sink.commit() == 1
    with pytest.raises(SinkError, match="already committed"):
        await sink.write(ROWS[1:2])
    await sink.rollback()  # after commit: nothing to do
    await sink.close()
    await sink.close()
    assert await store.read(ds) == ROWS[:1]


# -- SQL stores: one transaction ---------------------------------------------------------------


async def test_nothing_is_visible_before_commit(sql_store):
    ds = sql_store.make()
    sink = await open_sink(ds, ds.columns, "INSERT", None)
    try:
        await sink.write(ROWS[:3])
        assert await sql_store.read(ds) == []
        await sink.write(ROWS[3:])
        assert await sink.commit() == len(ROWS)
    finally:
        await sink.close()
    assert len(await sql_store.read(ds)) == len(ROWS)


@pytest.mark.parametrize("mode", ["INSERT", "UPSERT"])
async def test_a_receipt_is_committed_with_the_rows_and_only_with_them(sql_store, mode):
    ds = sql_store.make()
    task = f"task-{uuid.uuid4().hex[:8]}"
    assert await find_receipt(ds, task, 1) is None  # no receipts table yet
    sink = await open_sink(ds, ds.columns, mode, None)
    try:
        await sink.write(ROWS)
        assert await find_receipt(ds, task, 1) is None  # not before the commit
        assert await sink.commit(Receipt(task, 1)) == len(ROWS)
    finally:
        await sink.close()
    assert await find_receipt(ds, task, 1) == Receipt(task, 1, len(ROWS))
    assert await find_receipt(ds, task, 2) is None  # another run of the same task


@pytest.mark.parametrize("end", ["rollback", "close"])
async def test_rollback_and_close_without_commit_leave_the_table_unchanged(sql_store, end):
    ds = sql_store.make()
    await _write(ds, ROWS[:2])
    sink = await open_sink(ds, ds.columns, "UPSERT", None)
    await sink.write([(1, "changed", None, None, None, None, None)] + ROWS[2:])
    if end == "rollback":
        await sink.rollback()
        await sink.rollback()  # idempotent
    await sink.close()
    assert await sql_store.read(ds) == ROWS[:2]
    assert await _write(ds, ROWS[2:]) == len(ROWS) - 2  # the table is free for the next import


async def test_a_key_repeated_in_the_file_is_a_duplicate_in_insert_mode(sql_store):
    ds = sql_store.make()
    await _write(ds, ROWS[:1])
    with pytest.raises(DuplicateKeyError, match=r"the file has more than one row with id=3 \(row 6"):
        await _write(ds, ROWS[1:] + [ROWS[2]], batch=3)
    assert await sql_store.read(ds) == ROWS[:1]


async def test_a_missing_required_value_names_the_row_and_column(sql_store):
    ds = sql_store.make()
    table = ds.table
    if sql_store.name == "sqlite":  # a NOT NULL column
        table = "t2"
        con = sqlite3.connect(ds.url)
        con.execute("CREATE TABLE t2 (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
        con.close()
    else:
        sql_store.pg.execute(f'ALTER TABLE "{ds.table}" ALTER COLUMN name SET NOT NULL')
    ds = Dataset(name="things", source=ds.source, url=ds.url, table=table, columns=COLUMNS[:2], key=("id",))
    with pytest.raises(SinkError, match="row 2 has no value for column 'name'") as e:
        await _write(ds, [(1, "a"), (2, None), (3, "c")], batch=10)
    assert e.value.row == 2 and not isinstance(e.value, DuplicateKeyError)
    assert await sql_store.read(ds) == []


async def test_upsert_needs_a_unique_constraint_on_the_key(sql_store):
    ds = sql_store.make(unique=False)
    with pytest.raises(SinkError, match=r"UPSERT needs a primary key or unique .* on \(id\)"):
        await open_sink(ds, ds.columns, "UPSERT", None)
    await _write(ds, ROWS[:1])  # INSERT needs none


async def test_unknown_tables_and_columns_are_refused_at_open(sql_store):
    ds = sql_store.make()
    missing = Dataset(name="things", source=ds.source, url=ds.url, table="nope", columns=COLUMNS, key=("id",))
    with pytest.raises(SinkError, match="'nope' does not exist"):
        await open_sink(missing, COLUMNS, "INSERT", None)
    with pytest.raises(SinkError, match="has no column 'colour'"):
        await open_sink(ds, (*COLUMNS, Column("colour")), "INSERT", None)


async def test_compound_keys(sql_store):
    columns = (Column("site"), Column("no", "integer"), Column("depth", "float"))
    ds = sql_store.make(key=("site", "no"), columns=columns)
    await _write(ds, [("a", 1, 1.0), ("a", 2, 2.0), ("b", 1, 3.0)])
    await _write(ds, [("a", 2, 20.0), ("c", 1, 4.0)], "UPSERT")
    assert await sql_store.read(ds) == [("a", 1, 1.0), ("a", 2, 20.0), ("b", 1, 3.0), ("c", 1, 4.0)]
    with pytest.raises(DuplicateKeyError, match=r"a row with \(site, no\)=\('b', 1\) already exists"):
        await _write(ds, [("d", 1, None), ("b", 1, None)])


async def test_a_cancelled_write_rolls_back(sql_store):
    ds = sql_store.make()
    await _write(ds, ROWS[:2])
    big = [(i, f"row {i}", i / 7, i % 2 == 0, "2020-01-01", "2020-01-01T00:00:00.5Z", "n") for i in range(10, 400_010)]
    sink = await open_sink(ds, ds.columns, "INSERT", None)
    try:
        await sink.write(ROWS[2:3])
        task = asyncio.create_task(sink.write(big))
        await asyncio.sleep(0.3)
        assert not task.done()
        task.cancel()
        started = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        await sink.rollback()
        assert time.monotonic() - started < 2  # a cancelled import stops within 2 seconds
        if sql_store.name == "postgres":  # the session is gone, not left idle in its transaction
            assert not any(s.startswith("idle in transaction") for s in sql_store.sessions())
            assert sql_store.no_sessions_left()
    finally:
        await sink.close()
    assert await sql_store.read(ds) == ROWS[:2]
    assert await _write(ds, ROWS[2:]) == len(ROWS) - 2


async def test_a_busy_sqlite_database_is_a_transient_error(sqlite_store):
    ds = sqlite_store.make()
    first = await open_sink(ds, ds.columns, "INSERT", None)
    try:
        await first.write(ROWS[:1])  # holds the write lock until it ends
        second = await open_sink(ds, ds.columns, "INSERT", Settings(sqlite_busy_timeout_seconds=0.1))
        try:
            with pytest.raises(SinkError, match="busy") as e:
                await second.write(ROWS[1:2])
            assert e.value.transient
        finally:
            await second.close()
        assert await first.commit() == 1
    finally:
        await first.close()


async def test_an_unreachable_postgres_is_a_transient_error(postgres_store):
    ds = postgres_store.make()
    gone = Dataset(
        name="things",
        source="postgres",
        url=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
        table=ds.table,
        columns=COLUMNS,
        key=("id",),
    )
    with pytest.raises(SinkError, match="'things' is unavailable") as e:
        await open_sink(gone, COLUMNS, "INSERT", None)
    assert e.value.transient


AFTER_KILL = (100, "after the kill", None, None, None, None, None)  # a key the killed writer had written
_KILLED_WRITER = """
import asyncio, json, sys, time
from sources.base import Column, Dataset
from sources.sinks import open_sink

spec = json.loads(sys.argv[1])
columns = tuple(Column(**c) for c in spec.pop("columns"))
dataset = Dataset(columns=columns, key=tuple(spec.pop("key")), **spec)

async def main():
    sink = await open_sink(dataset, columns, "INSERT", None)
    for start in range(0, 60_000, 5_000):
        await sink.write([(i, f"row {i}", i / 3, True, "2020-01-01", "2020-01-01T00:00:00Z", None)
                          for i in range(100 + start, 100 + start + 5_000)])
    print("written", flush=True)
    time.sleep(60)  # killed here, before commit

asyncio.run(main())
"""


@pytest.mark.parametrize("journal", ["wal", "delete"])
async def test_a_killed_sqlite_writer_leaves_the_table_unchanged(tmp_path, journal):
    store = SqliteStore(tmp_path, journal)
    ds = store.make()
    await _write(ds, ROWS[:2])
    _kill_a_writer(ds)
    # In rollback-journal mode the killed writer leaves a hot journal; the source's read-only
    # connection cannot roll it back, so the source opens the file read-write once to do it.
    assert await store.read(ds) == ROWS[:2]
    assert await _write(ds, ROWS[2:] + [AFTER_KILL]) == len(ROWS) - 1  # id 100 was the killed writer's
    assert len(await store.read(ds)) == len(ROWS) + 1


async def test_a_killed_postgres_writer_leaves_the_table_unchanged(postgres_store):
    ds = postgres_store.make()
    await _write(ds, ROWS[:2])
    _kill_a_writer(ds)
    assert await postgres_store.read(ds) == ROWS[:2]
    assert await _write(ds, ROWS[2:] + [AFTER_KILL]) == len(ROWS) - 1  # the killed writer's keys are free again
    assert len(await postgres_store.read(ds)) == len(ROWS) + 1


def _kill_a_writer(ds: Dataset) -> None:
    spec = {
        "name": ds.name,
        "source": ds.source,
        "url": ds.url,
        "table": ds.table,
        "key": list(ds.key),
        "columns": [{"name": c.name, "type": c.type} for c in ds.columns],
    }
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, json.dumps(spec)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "written"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(10)
        process.stdout.close()


# -- PostgreSQL --------------------------------------------------------------------------------


async def test_postgres_timestamps_without_time_zone_and_other_types(postgres_store):
    ds = postgres_store.make()
    postgres_store.pg.execute(
        f'ALTER TABLE "{ds.table}" ALTER COLUMN seen_at TYPE timestamp, '
        f"ALTER COLUMN name TYPE varchar(80), ALTER COLUMN score TYPE numeric, "
        f"ALTER COLUMN id TYPE integer"
    )
    rows = [r for r in ROWS if r[0] < 2**31]
    await _write(ds, rows)
    assert await postgres_store.read(ds) == sorted(rows)


async def test_postgres_bad_values_name_the_row_and_column(postgres_store):
    ds = postgres_store.make()
    postgres_store.pg.execute(f'ALTER TABLE "{ds.table}" ALTER COLUMN name TYPE varchar(5)')
    rows = [(i, "short", None, None, None, None, None) for i in range(1, 8)] + [(8, "far too long", *[None] * 5)]
    with pytest.raises(SinkError, match=r"row 8, column 'name': value too long") as e:
        await _write(ds, rows, batch=3)
    assert e.value.row == 8 and not e.value.transient
    with pytest.raises(SinkError, match=r"row 2, column 'notes': .*NUL"):
        await _write(ds, [ROWS[0], (2, "x", None, None, None, None, "a\0b")])
    assert await postgres_store.read(ds) == []


async def test_postgres_without_the_c_formatter_rows_go_through_write_row(postgres_store, monkeypatch):
    import sources.postgres_sink as module

    monkeypatch.setattr(module, "_FORMAT_ROW", None)
    ds = postgres_store.make()
    await _write(ds, ROWS)
    assert await postgres_store.read(ds) == sorted(ROWS)


async def test_postgres_jsonb_fields_cannot_be_imported(postgres_store, pg):
    ds = postgres_store.make()
    pg.execute(f'ALTER TABLE "{ds.table}" ADD COLUMN data jsonb')
    columns = (ds.column("id"), Column("data.depth", "float"))
    docs = Dataset(name="docs", source="postgres", url=ds.url, table=ds.table, columns=columns, key=("id",))
    with pytest.raises(SinkError, match="'data.depth' is a field of the JSONB column 'data'; importing into JSONB"):
        await open_sink(docs, columns, "INSERT", None)
    assert postgres_store.no_sessions_left()


async def test_postgres_a_long_import_restarts_its_copy_and_counts_rows_across_it(postgres_store, monkeypatch):
    import sources.postgres_sink as module

    monkeypatch.setattr(module, "COPY_ROWS", 3)
    ds = postgres_store.make()
    await _write(ds, ROWS[:1])
    rows = [(i, f"r{i}", None, None, None, None, None) for i in range(10, 17)] + [ROWS[0]]
    with pytest.raises(DuplicateKeyError, match=r"id=1 already exists .*\(row 8\)") as e:
        await _write(ds, rows, batch=2)
    assert e.value.row == 8
    assert await _write(ds, rows[:-1], batch=2) == 7
    assert len(await postgres_store.read(ds)) == 8


# -- PostgreSQL: rows as text (write_text) -----------------------------------------------------------

# ROWS as a CSV import has them: no empty text (an empty cell is no value).
CSV_ROWS = [tuple(None if v == "" else v for v in row) for row in ROWS]


def as_text(rows: list[tuple]) -> list[list[str]]:
    """Rows as write_text takes them: column by column, as ColumnChecker's TEXT output spells them."""
    return [[text_form(v) for v in column] for column in zip(*rows, strict=True)]


async def _write_text(dataset: Dataset, rows: list[tuple], batch: int = 4, texts=None, mode: str = "INSERT") -> int:
    sink = await open_sink(dataset, dataset.columns, mode, None)
    try:
        for start in range(0, len(rows), batch):
            part = rows[start : start + batch]
            cells = as_text(part) if texts is None else [column[start : start + batch] for column in texts]
            await sink.write_text(cells, len(part))
        return await sink.commit()
    finally:
        await sink.close()


def stored(pg: psycopg.Connection, table: str) -> list[str]:
    """Every row as PostgreSQL prints it (floats in full), in id order."""
    pg.execute("SET extra_float_digits = 3")
    pg.execute("SET TimeZone = 'UTC'")
    return [r for (r,) in pg.execute(f'SELECT t::text FROM "{table}" t ORDER BY 1').fetchall()]


@pytest.mark.parametrize("batch", [1, 4])  # 1: batches all ASCII too (joined whole rather than row by row)
@pytest.mark.parametrize("mode", ["INSERT", "UPSERT"])
async def test_postgres_text_rows_are_stored_as_their_typed_rows(postgres_store, batch, mode):
    """write_text stores what write stores for the same rows, also in columns of other types than
    the natural ones (where a float is written as its repr, a boolean as t/f)."""
    pg = postgres_store.pg
    sink = await open_sink(postgres_store.make(), COLUMNS, "INSERT", None)
    assert callable(sink.write_text)
    await sink.close()
    for retype in (
        None,
        "score TYPE numeric, ALTER COLUMN active TYPE text, ALTER COLUMN seen_at TYPE text, "
        "ALTER COLUMN born TYPE text, ALTER COLUMN name TYPE varchar(80)",
    ):
        typed, text = postgres_store.make(), postgres_store.make()
        for ds in (typed, text):
            if retype:
                pg.execute(f'ALTER TABLE "{ds.table}" ALTER COLUMN {retype}')
        assert (
            await _write(typed, CSV_ROWS, mode=mode, batch=batch)
            == await _write_text(text, CSV_ROWS, mode=mode, batch=batch)
            == len(CSV_ROWS)
        )
        assert stored(pg, text.table) == stored(pg, typed.table)
    assert await postgres_store.read(text) == sorted(CSV_ROWS)


def float_texts() -> list[str]:
    """Float texts as ColumnChecker passes them on (PLAIN_FLOAT_TEXT), where PostgreSQL's strtod and
    float() must agree: long mantissas, exponents, exact ties between two doubles and next to them."""
    rng = random.Random(20261121)
    texts = ["0", "-0", "0.0", "-0.0", "+1", "1.50", "1E5", "1e-05", "2.5e-07", "00012.5000", "123456789012345.6",
             "0.1000000000000000055511151231257827021181583404541015625"[:42], "900719925474099.3e1", "1e99", "1e-99",
             "9.999999999999999e99", "0.00000000000000000000000000000000000001e-99"]  # fmt: skip
    for _ in range(3000):
        whole = "".join(rng.choices("0123456789", k=rng.randint(1, 15)))
        fraction = "".join(rng.choices("0123456789", k=rng.randint(0, 40)))
        text = rng.choice(["", "-", "+"]) + whole + (f".{fraction}" if fraction else "")
        if rng.random() < 0.4:
            text += f"{rng.choice('eE')}{rng.choice(['', '+', '-'])}{rng.randint(0, 99)}"
        texts.append(text)
    with localcontext(prec=200):  # exact
        for _ in range(1500):  # halfway between two doubles, exactly, and a hair either side
            x = rng.uniform(2.0**20, 2.0**49) * rng.choice([1, 2**-10, 2**-20])
            middle = (Decimal(x) + Decimal(math.nextafter(x, math.inf))) / 2
            for near in (middle, middle + Decimal("1e-40"), middle - Decimal("1e-40")):
                text = f"{near:f}"
                if re.fullmatch(PLAIN_FLOAT_TEXT, text):
                    texts.append(text)
    assert all(re.fullmatch(PLAIN_FLOAT_TEXT, t) for t in texts)
    return texts


async def test_postgres_reads_plain_float_texts_as_python_does(postgres_store):
    """A float column of type double precision takes the file's own text: the server must read
    every text of the plain form as float() does (both round correctly; the form rules out
    overflow and underflow). Other float columns get repr(float(text)), as typed rows do."""
    texts = float_texts()
    columns = (Column("id", "integer"), Column("x", "float"), Column("n", "float"))
    rows = [(i, float(t), float(t)) for i, t in enumerate(texts)]
    typed, text = postgres_store.make(columns=columns), postgres_store.make(columns=columns)
    for ds in (typed, text):
        postgres_store.pg.execute(f'ALTER TABLE "{ds.table}" ALTER COLUMN n TYPE numeric')
    cells = [[str(i) for i in range(len(texts))], texts, texts]
    await _write(typed, rows, batch=1000)
    await _write_text(text, rows, batch=1000, texts=cells)
    exact = postgres_store.pg.execute(f'SELECT id, float8send(x) FROM "{text.table}" ORDER BY id').fetchall()
    assert [bytes(b) for _, b in exact] == [struct.pack(">d", float(t)) for t in texts]
    assert stored(postgres_store.pg, text.table) == stored(postgres_store.pg, typed.table)


async def test_postgres_text_rows_fail_as_typed_rows_do(postgres_store):
    """A NUL in a text, a missing key, a duplicate key: the same errors, rows numbered across
    write and write_text."""
    ds = postgres_store.make()
    with pytest.raises(SinkError, match=r"row 2, column 'notes': .*NUL") as typed:
        await _write(ds, [CSV_ROWS[0], (2, "x", None, None, None, None, "a\0b")])
    with pytest.raises(SinkError, match=r"row 2, column 'notes': .*NUL") as text:
        await _write_text(ds, [CSV_ROWS[0], (2, "x", None, None, None, None, "a\0b")])
    assert str(text.value) == str(typed.value) and text.value.row == 2
    with pytest.raises(SinkError, match=r"row 3 has no value for the key column 'id'"):
        await _write_text(ds, [CSV_ROWS[0], CSV_ROWS[1], (None, "x", None, None, None, None, None)])
    sink = await open_sink(ds, ds.columns, "INSERT", None)
    try:
        await sink.write(CSV_ROWS[:3])
        with pytest.raises(DuplicateKeyError, match=r"the file has more than one row with id=2 \(row 5\)") as e:
            await sink.write_text(as_text([CSV_ROWS[3], CSV_ROWS[1]]), 2)
            await sink.commit()
        assert e.value.row == 5
    finally:
        await sink.close()
    assert await postgres_store.read(ds) == []


# -- OpenSearch ---------------------------------------------------------------------------------


async def test_opensearch_a_rerun_converges_and_a_different_document_is_a_duplicate(opensearch_store):
    ds = opensearch_store.make()
    await _write(ds, ROWS[:4])
    await _write(ds, ROWS, batch=3)  # the first four exist with the same values: no error
    assert await opensearch_store.read(ds) == sorted(ROWS)
    changed = (3, *ROWS[2][1:6], "different")
    with pytest.raises(
        DuplicateKeyError,
        match=r"a row with id=3 already exists .* with notes='' \(the file has "
        r"'different'\)",
    ):
        await _write(ds, [changed])
    assert await opensearch_store.read(ds) == sorted(ROWS)


async def test_opensearch_a_cancelled_import_run_again_converges(opensearch_store):
    ds = opensearch_store.make()
    rows = [(i, f"row {i}", i / 4, i % 3 == 0, "2020-01-02", "2020-01-02T03:04:05.25Z", None) for i in range(1, 1201)]
    sink = await open_sink(ds, ds.columns, "INSERT", None)
    some_written = asyncio.Event()

    async def run() -> None:
        for start in range(0, len(rows), 100):
            await sink.write(rows[start : start + 100])
            if start >= 300:
                some_written.set()

    task = asyncio.create_task(run())
    await some_written.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await sink.close()  # cannot take back what was written
    opensearch_store.client.indices.refresh(index=ds.table)
    assert 300 <= opensearch_store.client.count(index=ds.table)["count"] < len(rows)
    assert await _write(ds, rows, batch=100) == len(rows)  # the same import again: no duplicates, no errors
    assert await opensearch_store.read(ds) == rows


async def test_opensearch_object_fields_and_compound_keys(opensearch_store):
    columns = (Column("site"), Column("no", "integer"), Column("loc.depth", "float"), Column("loc.rock"))
    ds = opensearch_store.make(key=("site", "no"), columns=columns)
    await _write(ds, [("a", 1, 1.5, "basalt"), ("a", 2, None, None)])
    await _write(ds, [("a", 2, 2.5, "granite")], "UPSERT")
    assert await opensearch_store.read(ds) == [("a", 1, 1.5, "basalt"), ("a", 2, 2.5, "granite")]
    doc = opensearch_store.client.get(index=ds.table, id='["a",1]')
    assert doc["_source"] == {"site": "a", "no": 1, "loc": {"depth": 1.5, "rock": "basalt"}}


async def test_opensearch_refuses_what_it_cannot_keep(opensearch_store):
    ds = opensearch_store.make(key=())
    with pytest.raises(SinkError, match="has no key: OpenSearch imports derive document ids from the key"):
        await open_sink(ds, ds.columns, "INSERT", None)
    ds = opensearch_store.make()
    with pytest.raises(SinkError, match="row 1, column 'score' holds nan"):
        await _write(ds, [(1, None, float("nan"), None, None, None, None)])
    missing = Dataset(
        name="things", source="opensearch", url=ds.url, table="dp-sink-missing", columns=COLUMNS, key=("id",)
    )
    with pytest.raises(SinkError, match="index 'dp-sink-missing' does not exist"):
        await open_sink(missing, COLUMNS, "INSERT", None)
    with pytest.raises(SinkError, match=r"row 2 \(document '2'\) was refused .*mapper_parsing_exception") as e:
        await _write(ds, [ROWS[0], (2, None, None, None, "not a date", None, None)])
    assert e.value.row == 2


async def test_opensearch_429_and_5xx_are_retried(opensearch_store):
    from sources.opensearch_sink import OpenSearchSink

    ds = opensearch_store.make()
    proxy = await FaultyProxy(ds.url).start()
    try:
        via_proxy = Dataset(
            name="things", source="opensearch", url=proxy.url, table=ds.table, columns=COLUMNS, key=("id",)
        )
        sink = await OpenSearchSink.open(via_proxy, COLUMNS, "INSERT", None, retry_delays=FAST)
        try:
            proxy.fault_paths, proxy.faults = ("/_bulk",), [429, 503]
            await sink.write(ROWS)
            assert [status for _, path, status in proxy.requests if "_bulk" in path] == [429, 503, 200]
            proxy.faults = [503] * 10
            with pytest.raises(SinkError) as e:
                await sink.write([(99, *ROWS[0][1:])])
            assert e.value.transient
        finally:
            await sink.close()
    finally:
        await proxy.stop()
    assert await opensearch_store.read(ds) == sorted(ROWS)
