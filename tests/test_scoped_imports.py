"""Imports into tenant-scoped datasets (issue 17, item 3): on SQLite, PostgreSQL and OpenSearch.

The import job runs in process (``workers.imports.run_import``) against real Redis, real local
storage and the real stores, on tasks made the way ``tasks.imports.request_import`` makes them,
with the caller's scope in the request (``tasks.access.scope_for_request``). What each import
wrote is read straight from the store.

Every dataset here is ``orders``: ``id`` (the key), ``org_id`` (integer, required, the scope
column, claim ``org``) and ``name``. Tenant 7 owns row 1 before each test; the caller is tenant 42
and their claim is the text ``"42"`` (an integer column against a string claim).
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from opensearchpy import OpenSearch

from dataport.settings import Settings
from sources.base import Dataset
from sources.receipts import find_receipt
from sources.sink_base import RowScope, SinkError
from sources.sinks import open_sink
from tasks.access import NO_ROWS, scope_for_request
from tasks.ids import random_task_id
from tasks.models import Task, TaskStatus
from tasks.services import Services
from tests.import_jobs import csv_file, read_csv, run_import_task

pytestmark = pytest.mark.timeout(120)

SOURCES = ("sqlite", "postgres", "opensearch")
MODES = ("INSERT", "UPSERT")
OURS, THEIRS = 42, 7
CLAIM = "42"  # as a token carries it: text, for an integer column


@dataclass
class World:
    services: Services
    sqlite_path: Path
    postgres_url: str
    pg_table: str
    opensearch_url: str
    os_index: str

    def dataset(self, source: str) -> Dataset:
        found = self.services.registry.get(f"orders_{source}")
        assert found is not None
        return found

    def rows(self, source: str) -> dict[int, tuple[Any, Any]]:
        """Every stored row: id → (org_id, name)."""
        if source == "sqlite":
            with sqlite3.connect(self.sqlite_path) as conn:
                return {i: (o, n) for i, o, n in conn.execute("SELECT id, org_id, name FROM orders")}
        if source == "postgres":
            with psycopg.connect(self.postgres_url) as conn:
                return {i: (o, n) for i, o, n in conn.execute(f'SELECT id, org_id, name FROM "{self.pg_table}"')}
        client = OpenSearch(self.opensearch_url)
        try:
            client.indices.refresh(index=self.os_index)
            hits = client.search(index=self.os_index, body={"size": 1000})["hits"]["hits"]
            return {h["_source"]["id"]: (h["_source"].get("org_id"), h["_source"].get("name")) for h in hits}
        finally:
            client.close()

    def seed(self, source: str, rows: list[tuple[int, int, str]]) -> None:
        if source == "sqlite":
            with sqlite3.connect(self.sqlite_path) as conn:
                conn.executemany("INSERT INTO orders VALUES (?, ?, ?)", rows)
        elif source == "postgres":
            with psycopg.connect(self.postgres_url, autocommit=True) as conn:
                with conn.cursor() as cur:
                    cur.executemany(f'INSERT INTO "{self.pg_table}" VALUES (%s, %s, %s)', rows)
        else:
            client = OpenSearch(self.opensearch_url)
            try:
                for i, org, name in rows:
                    client.index(index=self.os_index, id=str(i), body={"id": i, "org_id": org, "name": name})
                client.indices.refresh(index=self.os_index)
            finally:
                client.close()


@pytest.fixture
async def world(tmp_path, redis_url, postgres_db, opensearch_url, pg_table) -> AsyncIterator[World]:
    db = tmp_path / "orders.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, org_id INTEGER NOT NULL, name TEXT)")
    table = pg_table("orders")
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{table}" (id integer PRIMARY KEY, org_id bigint NOT NULL, name text)')
    index = f"orders_{uuid.uuid4().hex[:8]}"
    client = OpenSearch(opensearch_url)
    mapping = {"properties": {"id": {"type": "long"}, "org_id": {"type": "long"}, "name": {"type": "keyword"}}}
    client.indices.create(index=index, body={"mappings": mapping})
    client.close()
    toml = []
    for source, where in (
        ("sqlite", f'url = "{db}"\ntable = "orders"'),
        ("postgres", f'url = "{postgres_db}"\ntable = "{table}"'),
        ("opensearch", f'url = "{opensearch_url}"\nindex = "{index}"'),
    ):
        toml.append(f"""
[datasets.orders_{source}]
source = "{source}"
{where}
key = ["id"]
importable = true
scope = {{ column = "org_id", claim = "org" }}

[datasets.orders_{source}.columns]
id = {{ type = "integer", required = true }}
org_id = {{ type = "integer", required = true }}
name = {{ type = "string" }}
""")
    datasets = tmp_path / "datasets.toml"
    datasets.write_text("".join(toml))
    settings = Settings(
        redis_url=redis_url,
        datasets=datasets,
        data_dir=tmp_path / "data",
        jwt_secret="scoped-imports",
        queue_name=f"dataport:queue:scoped-{uuid.uuid4().hex[:6]}",
    )
    services = await Services.start(settings)
    world = World(services, db, postgres_db, table, opensearch_url, index)
    for source in SOURCES:
        world.seed(source, [(1, THEIRS, "theirs")])
    try:
        yield world
    finally:
        await services.close()
        client = OpenSearch(opensearch_url)
        client.indices.delete(index=index, ignore_unavailable=True)
        client.close()


def ndjson_file(records: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


async def run(
    world: World,
    source: str,
    content: bytes,
    *,
    scope: Any = CLAIM,
    file_format: str = "CSV",
    mode: str = "INSERT",
    dry_run: bool = False,
    request_scope: bool = True,
) -> tuple[Task, list[dict[str, str]]]:
    """One import task, made as ``request_import`` makes it and run to its end by the worker's job;
    the finished task and its error report's lines."""
    services = world.services
    identifier = random_task_id()
    file_name = f"orders.{file_format.lower()}"
    key = f"imports/tenant/{identifier}/{file_name}"
    request: dict[str, Any] = {"mode": mode, "dryRun": dry_run, "maxErrors": None, "fileName": file_name}
    if request_scope:
        request["scope"] = scope_for_request(scope)
    task = await run_import_task(
        services,
        identifier,
        owner="tenant-user",
        dataset=f"orders_{source}",
        file_format=file_format,
        key=key,
        content=content,
        request=request,
    )
    return task, await read_csv(services, task.report_key)


def succeeded(task: Task) -> None:
    assert task.status is TaskStatus.SUCCEEDED, (task.error_code, task.error_message)


# -- rows of another tenant ----------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
async def test_rows_of_another_tenant_are_refused_and_the_tenants_own_written(world: World, source: str):
    content = csv_file(["id", "org_id", "name"], [[10, 42, "mine"], [11, 7, "not mine"], [12, "", "filled"]])
    task, report = await run(world, source, content)
    succeeded(task)
    assert (task.rows_imported, task.rows_failed) == (2, 1)
    [line] = report
    assert line["row"] == "2" and line["column"] == "org_id"
    assert "belongs to another tenant" in line["reason"] and "42" in line["reason"]
    stored = world.rows(source)
    assert 11 not in stored
    assert stored[10] == (OURS, "mine") and stored[12] == (OURS, "filled")
    assert stored[1] == (THEIRS, "theirs")


@pytest.mark.parametrize("source", SOURCES)
async def test_records_of_another_tenant_are_refused_in_json_files_too(world: World, source: str):
    records = [{"id": 20, "org_id": 7, "name": "x"}, {"id": 21, "name": "filled"}, {"id": 22, "org_id": "42"}]
    task, report = await run(world, source, ndjson_file(records), file_format="NDJSON")
    succeeded(task)
    assert [(r["row"], r["column"]) for r in report] == [("1", "org_id")]
    stored = world.rows(source)
    assert 20 not in stored and stored[21] == (OURS, "filled") and stored[22][0] == OURS


@pytest.mark.parametrize("source", SOURCES)
async def test_the_scope_column_is_filled_when_the_file_lacks_it(world: World, source: str):
    # org_id is required, yet a header without it is fine: every row gets the caller's value.
    task, report = await run(world, source, csv_file(["id", "name"], [[30, "a"], [31, "b"]]))
    succeeded(task)
    assert report == [] and task.rows_imported == 2
    stored = world.rows(source)
    assert stored[30] == (OURS, "a") and stored[31] == (OURS, "b")


async def test_a_string_claim_is_compared_as_the_column_converts_it(world: World):
    # "042" and " 42" are not the integer 42's text but do they convert to it? "042" does.
    content = csv_file(["id", "org_id", "name"], [[40, "042", "a"], [41, "+42", "b"], [42, "420", "c"]])
    task, report = await run(world, "sqlite", content, scope=42)  # an integer claim, too
    succeeded(task)
    assert [r["row"] for r in report] == ["3"]
    stored = world.rows("sqlite")
    assert stored[40] == (OURS, "a") and stored[41] == (OURS, "b") and 42 not in stored


# -- keys held by another tenant's row -------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("source", SOURCES)
async def test_a_key_of_another_tenants_row_is_refused_and_that_row_unchanged(world: World, source: str, mode: str):
    world.seed(source, [(3, OURS, "old")])
    rows = [[1, 42, "taken"], [2, 42, "new"]] + ([[3, 42, "updated"]] if mode == "UPSERT" else [])
    task, report = await run(world, source, csv_file(["id", "org_id", "name"], rows), mode=mode)
    succeeded(task)
    [line] = report
    assert line["row"] == "1" and line["column"] == "id"
    assert "another tenant" in line["reason"] and "theirs" not in line["reason"]
    stored = world.rows(source)
    assert stored[1] == (THEIRS, "theirs")
    assert stored[2] == (OURS, "new")
    if mode == "UPSERT":
        assert stored[3] == (OURS, "updated")


@pytest.mark.parametrize("source", SOURCES)
async def test_an_upsert_without_the_scope_column_cannot_take_another_tenants_row(world: World, source: str):
    task, report = await run(world, source, csv_file(["id", "name"], [[1, "taken"]]), mode="UPSERT")
    succeeded(task)
    assert [(r["row"], r["column"]) for r in report] == [("1", "id")]
    assert world.rows(source)[1] == (THEIRS, "theirs")


@pytest.mark.parametrize("source", SOURCES)
async def test_a_dry_run_reports_the_same_row_errors(world: World, source: str):
    content = csv_file(["id", "org_id", "name"], [[1, 42, "taken"], [50, 7, "theirs"], [51, 42, "fine"]])
    task, report = await run(world, source, content, mode="UPSERT", dry_run=True)
    succeeded(task)
    assert (task.rows_imported, task.rows_failed) == (1, 2)
    assert [(r["row"], r["column"]) for r in report] == [("1", "id"), ("2", "org_id")]
    assert world.rows(source) == {1: (THEIRS, "theirs")}


# -- no tenant -----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
async def test_a_task_whose_token_lacked_the_claim_writes_nothing(world: World, source: str):
    content = csv_file(["id", "org_id", "name"], [[60, 42, "a"], [61, 7, "b"]])
    task, _ = await run(world, source, content, scope=NO_ROWS)
    assert task.status is TaskStatus.FAILED and task.error_code == "FORBIDDEN"
    assert "'org' claim" in (task.error_message or "") and "requested without one" in (task.error_message or "")
    unscoped, _ = await run(world, source, content, request_scope=False)  # asked before the dataset was scoped
    assert unscoped.status is TaskStatus.FAILED and unscoped.error_code == "FORBIDDEN"
    assert world.rows(source) == {1: (THEIRS, "theirs")}


async def test_a_claim_that_is_no_value_of_the_column_writes_nothing(world: World):
    task, _ = await run(world, "postgres", csv_file(["id", "name"], [[70, "a"]]), scope="acme")
    assert task.status is TaskStatus.FAILED and task.error_code == "FORBIDDEN"
    assert world.rows("postgres") == {1: (THEIRS, "theirs")}


async def test_receipts_still_record_a_scoped_import(world: World):
    for source in ("sqlite", "postgres"):
        task, _ = await run(world, source, csv_file(["id", "name"], [[80, "a"], [81, "b"]]))
        succeeded(task)
        receipt = await find_receipt(world.dataset(source), task.id, task.run)
        assert receipt is not None and receipt.rows == 2


# -- the sinks' own guards (behind the worker's checks) ------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
async def test_a_sink_refuses_a_row_of_another_tenant(world: World, source: str):
    dataset = world.dataset(source)
    sink = await open_sink(dataset, dataset.columns, "INSERT", None, RowScope("org_id", OURS))
    try:
        with pytest.raises(SinkError, match="another tenant"):
            await sink.write([(90, THEIRS, "sneaked")])
    finally:
        await sink.close()
    assert 90 not in world.rows(source)


@pytest.mark.parametrize("source", SOURCES)
async def test_an_upsert_sink_never_changes_another_tenants_row(world: World, source: str):
    # The worker asks foreign_rows first; this is the write's own guard, for a row that got past it
    # (another tenant writing the key between the look-up and the write).
    dataset = world.dataset(source)
    sink = await open_sink(dataset, dataset.columns, "UPSERT", None, RowScope("org_id", OURS))
    assert await sink.foreign_rows([(1, OURS, "taken"), (95, OURS, "new")]) == [0]
    try:
        with pytest.raises(SinkError) as caught:
            await sink.write([(1, OURS, "taken"), (95, OURS, "new")])
            await sink.commit()
        assert caught.value.transient and "theirs" not in str(caught.value)
    finally:
        await sink.close()
    assert world.rows(source)[1] == (THEIRS, "theirs")


async def test_an_opensearch_insert_conflict_with_another_tenant_names_none_of_its_values(world: World):
    dataset = world.dataset("opensearch")
    sink = await open_sink(dataset, dataset.columns, "INSERT", None, RowScope("org_id", OURS))
    try:
        with pytest.raises(SinkError) as caught:
            await sink.write([(1, OURS, "taken")])
        assert caught.value.transient and "theirs" not in str(caught.value) and "7" not in str(caught.value)
    finally:
        await sink.close()
    assert world.rows("opensearch")[1] == (THEIRS, "theirs")


async def test_an_opensearch_upsert_writes_only_the_document_version_it_looked_at(world: World):
    # The race the guard is for, played in order on the real server: the sink looks (mget), then
    # the document changes hands, then the sink writes. The write must not land.
    world.seed("opensearch", [(3, OURS, "ours")])
    dataset = world.dataset("opensearch")
    sink = await open_sink(dataset, dataset.columns, "UPSERT", None, RowScope("org_id", OURS))
    try:
        rows, ids, lines, numbers = await sink._guarded_lines([(3, OURS, "mine again")], ["3"], 1)
        world.seed("opensearch", [(3, THEIRS, "taken over")])
        with pytest.raises(SinkError) as caught:
            await sink._bulk([0], lines, ids, 1, numbers)
        assert caught.value.transient
        # An INSERT that meets another tenant's document (written after the look) fails alike,
        # naming none of its values.
        insert = await open_sink(dataset, dataset.columns, "INSERT", None, RowScope("org_id", OURS))
        try:
            conflicts = await insert._bulk([0], insert._lines([(3, OURS, "x")], ["3"]), ["3"], 1)
            with pytest.raises(SinkError) as compared:
                await insert._compare([(3, OURS, "x")], ["3"], conflicts, 1)
            assert compared.value.transient and "taken over" not in str(compared.value)
        finally:
            await insert.close()
    finally:
        await sink.close()
    assert world.rows("opensearch")[3] == (THEIRS, "taken over")
