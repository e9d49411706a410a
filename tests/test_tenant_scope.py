"""Tenant-scoped reads at the source level: ``build_query(scope=…)`` and every source's every path
(count, rows, CSV; PostgreSQL's COPY, key-range splits, documents flattened in helper processes;
OpenSearch's point in time, scroll and helper-rendered pages) return exactly the tenant's rows,
nothing for ``NO_ROWS``, and bind the value instead of splicing it (tests/tenant_data.py holds
the rows). The property test over random filters is tests/test_tenant_scope_property.py."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import psycopg
import pytest

import tasks.access
from dataport.errors import UserErrors
from sources.base import Column, SourceError
from sources.opensearch import OpenSearchSource
from sources.opensearch.dsl import compile_query as opensearch_query
from sources.postgres import POSTGRES, PostgresSource
from sources.query import NO_ROWS, ScopeMissing, TenantScope, build_query
from sources.sql import SQLITE, compile_query
from sources.sqlite import SqliteSource
from tests import tenant_data as data
from tests.tenant_data import ORGS, ROWS, TEAM, owned

INJECTION = "x' OR '1'='1"  # a real team in the rows: its rows, and only those
UNKNOWN_INJECTION = "' OR '1'='1"  # no one's team: nothing


async def _rows(source: Any, query: Any, batch_rows: int = 50) -> list[tuple]:
    return [row async for batch in source.batches(query, batch_rows) for row in batch]


async def _csv_ids(source: Any, query: Any, batch_rows: int = 50) -> list[int]:
    """The first column of ``csv_batches`` (the key), after the header."""
    chunks = [chunk async for chunk, _ in source.csv_batches(query, batch_rows, formula_guard=True)]
    lines = list(csv.reader(io.StringIO(b"".join(chunks).decode())))
    return [int(line[0]) for line in lines[1:]]


def _ids(rows: list[tuple]) -> list[int]:
    return [r[0] for r in rows]


# -- build_query ---------------------------------------------------------------------------------

SCOPED = data.dataset("sqlite", "unused.sqlite3", "t")
UNSCOPED = data.dataset("sqlite", "unused.sqlite3", "t", scope="")


def test_the_scope_is_set_only_for_a_scoped_dataset():
    assert build_query(UNSCOPED).scope is None
    assert build_query(UNSCOPED, scope=3).scope is None  # a value for an unscoped dataset: no scope
    assert build_query(UNSCOPED, scope=NO_ROWS).scope is None
    assert build_query(SCOPED, scope=3).scope == TenantScope(SCOPED.by_name["org"], 3)


def test_a_scoped_dataset_without_a_scope_value_fails_closed():
    with pytest.raises(ScopeMissing):
        build_query(SCOPED)
    with pytest.raises(ScopeMissing):
        build_query(SCOPED, scope=None)


@pytest.mark.parametrize(
    ("claim", "expected"),
    [
        ("42", 42),
        (42, 42),
        (42.0, 42),
        (" 7 ", 7),
        ("4.5", None),
        ("abc", None),
        (INJECTION, None),
        (2**64, None),
        (True, None),
        ([1], None),
        ({"id": 1}, None),
        (object(), None),
        (NO_ROWS, None),
        (tasks.access.NO_ROWS, None),
    ],
)
def test_claims_are_converted_to_the_column_type_and_anything_else_is_no_rows(claim, expected):
    scope = build_query(SCOPED, scope=claim).scope
    assert scope is not None
    assert (scope.value, scope.nothing) == (expected, expected is None)


def test_a_text_scope_column_takes_numbers_as_text():
    ds = data.dataset("sqlite", "unused.sqlite3", "t", scope="team")
    assert build_query(ds, scope=7).scope.value == "7"
    assert build_query(ds, scope="a\x00b").scope.nothing  # not text any source can bind


def test_the_scope_needs_no_filterable_column_and_users_still_cannot_filter_on_it():
    assert not SCOPED.by_name["org"].filterable
    with pytest.raises(UserErrors) as e:
        build_query(SCOPED, filters=[{"field": "org", "op": "EQ", "value": 1}], scope=2)
    assert "2" not in str(e.value.errors[0].message)


def test_the_value_is_bound_and_never_in_the_statement_or_the_repr():
    ds = data.dataset("sqlite", "unused.sqlite3", "t", scope="team")
    query = build_query(ds, filters=[{"field": "name", "op": "EQ", "value": "a"}], scope=INJECTION)
    for dialect in (SQLITE, POSTGRES):
        compiled = compile_query(query, "t", dialect, count_cap=10)
        assert "OR '1'" not in compiled.select and "OR '1'" not in compiled.count
        assert compiled.params == (INJECTION, "a")  # the scope first, then the filters
        assert compiled.select.count(dialect.placeholder) == 2
    assert INJECTION not in repr(query)
    body = opensearch_query(query)
    assert body["query"]["bool"]["filter"][0] == {"term": {"team": INJECTION}}
    nothing = build_query(ds, scope=NO_ROWS)
    assert " WHERE FALSE " in compile_query(nothing, "t", SQLITE).select
    assert opensearch_query(nothing)["query"]["bool"]["filter"] == [{"match_none": {}}]


# -- SQLite --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tenants") / "tenants.sqlite3"
    data.load_sqlite(path, "rows")
    return str(path)


async def _check_every_tenant(source: Any, with_csv: bool) -> None:
    """Count, rows (and CSV) of every tenant, a string claim, a claim of no one, and NO_ROWS."""
    ds = source.dataset
    for claim, tenant in [*((o, o) for o in ORGS), ("3", 3), (99, 99), (INJECTION, None), (NO_ROWS, None)]:
        query = build_query(ds, scope=claim)
        expected = owned(tenant) if tenant is not None else []
        assert await source.count(query) == len(expected), claim
        assert await _rows(source, query) == expected, claim
        if with_csv:
            assert await _csv_ids(source, query) == _ids(expected), claim
    # with the user's own filters, sort and limit on top
    query = build_query(
        ds, filters=[{"field": "flag", "op": "EQ", "value": True}], sort=[{"field": "id", "direction": "DESC"}],
        limit=20, scope=2,
    )  # fmt: skip
    expected = [r for r in reversed(owned(2)) if r[5] is True][:20]
    assert await _rows(source, query) == expected
    assert await source.count(query) == len(expected)


async def _check_text_tenants(source: Any) -> None:
    """A text scope: case counts ("acme" is not "Acme"), and a quote-and-OR claim is a value."""
    ds = replace(source.dataset, scope=data.dataset("sqlite", "", "", scope="team", claim="team").scope)
    for claim in ["acme", "Acme", INJECTION, UNKNOWN_INJECTION, "ACME"]:
        query = build_query(ds, scope=claim)
        expected = owned(claim, at=TEAM)
        assert await source.count(query) == len(expected), claim
        assert await _rows(source, query) == expected, claim
    assert owned("acme", at=TEAM) and owned(INJECTION, at=TEAM) and not owned(UNKNOWN_INJECTION, at=TEAM)


async def test_sqlite_reads_only_the_tenants_rows(sqlite_path):
    source = SqliteSource(data.dataset("sqlite", sqlite_path, "rows"))
    await _check_every_tenant(source, with_csv=False)
    await _check_text_tenants(source)


# -- PostgreSQL ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_rows(postgres_db) -> Iterator[str]:
    table = f"tenants_{uuid.uuid4().hex[:8]}"
    data.load_postgres(postgres_db, table)
    yield table
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        conn.execute(f'DROP TABLE IF EXISTS "{table}"')


async def test_postgres_count_rows_and_copy_read_only_the_tenants_rows(postgres_db, pg_rows):
    source = PostgresSource(data.dataset("postgres", postgres_db, pg_rows))
    await _check_every_tenant(source, with_csv=True)
    await _check_text_tenants(source)
    await source.close()


async def test_postgres_reads_by_key_ranges_are_scoped(postgres_db, pg_rows, monkeypatch):
    monkeypatch.setattr("sources.postgres.ranges.SPLIT_BYTES", 0)
    monkeypatch.setattr("sources.postgres.ranges.RANGE_BYTES", 8 * 1024)
    ds = data.dataset("postgres", postgres_db, pg_rows)
    source = PostgresSource(ds)
    conn = await source._connect(snapshot=True)
    assert len(await source._key_ranges(conn, build_query(ds, scope=1))) > 4
    await source._release(conn)
    await _check_every_tenant(source, with_csv=True)  # COPY per range, and cursors per range
    await source.close()


DOCUMENT_COLUMNS = (
    *data.COLUMNS,
    Column("data.org", "integer"),
    Column("data.n", "integer"),
    Column("data.s"),
    Column("data.f", "float"),
)


def _with_document(row: tuple) -> tuple:
    d = data.document(row)
    return (*row, d["org"], d["n"], d["s"], d["f"])


@pytest.mark.parametrize("split", [False, True], ids=["one-connection", "key-ranges"])
async def test_postgres_documents_flattened_in_helper_processes_are_scoped(postgres_db, pg_rows, monkeypatch, split):
    """Documents flattened in Python (every field fetched whole): by the worker, by helper processes
    past ``HELPERS_AFTER_CELLS``, and, split by key ranges, read by the helpers themselves."""
    monkeypatch.setattr("sources.postgres.plans.INLINE_FIELDS", 0)
    monkeypatch.setattr("sources.postgres.plans.SMALL_DOCUMENT_BYTES", 0)
    monkeypatch.setattr("sources.postgres.helper_reads.HELPERS_AFTER_CELLS", 500)
    if split:
        monkeypatch.setattr("sources.postgres.ranges.SPLIT_BYTES", 0)
        monkeypatch.setattr("sources.postgres.ranges.RANGE_BYTES", 8 * 1024)
    ds = data.dataset("postgres", postgres_db, pg_rows, columns=DOCUMENT_COLUMNS)
    source = PostgresSource(ds)
    for claim, tenant in [(1, 1), ("4", 4), (NO_ROWS, None), (INJECTION, None)]:
        query = build_query(ds, scope=claim)
        expected = owned(tenant) if tenant is not None else []
        assert await _csv_ids(source, query, 20) == _ids(expected), claim
        assert await _rows(source, query, 20) == [_with_document(r) for r in expected], claim
    await source.close()


async def test_postgres_a_jsonb_field_can_be_the_scope_column(postgres_db, pg_rows):
    ds = data.dataset("postgres", postgres_db, pg_rows, scope="data.org", columns=DOCUMENT_COLUMNS)
    source = PostgresSource(ds)
    for claim, tenant in [(5, 5), ("2", 2), (NO_ROWS, None)]:
        query = build_query(ds, scope=claim)
        expected = owned(tenant) if tenant is not None else []
        assert await source.count(query) == len(expected)
        assert await _csv_ids(source, query) == _ids(expected)
    await source.close()


async def test_postgres_a_bad_cell_is_looked_for_among_the_tenants_rows_only(postgres_db, pg):
    """A value that does not cast names the row that holds it (``_explain``): a row of the tenant's,
    never one of the other tenants' rows that hold the same bad value."""
    table = f"tenants_bad_{uuid.uuid4().hex[:8]}"
    data.load_postgres(postgres_db, table, ROWS[:60])
    try:
        own = [r for r in ROWS[:60] if r[1] == 1][-1]
        bad = "jsonb_set(data, '{n}', '\"oops\"')"
        pg.execute(f"UPDATE {table} SET data = {bad} WHERE org IS DISTINCT FROM 1 OR id = %s", (own[0],))
        ds = data.dataset("postgres", postgres_db, table, columns=DOCUMENT_COLUMNS)
        source = PostgresSource(ds)
        query = build_query(ds, filters=[{"field": "data.n", "op": "GTE", "value": 0}], scope=1)
        with pytest.raises(SourceError) as e:
            await _rows(source, query)
        assert f"in the row with id = {own[0]}," in str(e.value)
        await source.close()
    finally:
        pg.execute(f'DROP TABLE "{table}"')


# -- OpenSearch ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def os_index(opensearch_url) -> Iterator[str]:
    index = f"dp-tenants-{uuid.uuid4().hex[:8]}"
    data.load_opensearch(opensearch_url, index)
    yield index
    data.drop_opensearch(opensearch_url, index)


@pytest.mark.parametrize(
    "options",
    [
        {"page_rows": 100, "pit_max_pages": 1000},  # a point in time with search_after
        {"page_rows": 100, "pit_max_pages": 0},  # one sorted scroll
        {"page_rows": 100, "helpers_after_cells": 1},  # pages rendered to CSV by helper processes
    ],
    ids=["pit", "scroll", "helpers"],
)
async def test_opensearch_reads_only_the_tenants_rows(opensearch_url, os_index, options):
    source = OpenSearchSource(data.dataset("opensearch", opensearch_url, os_index), **options)
    try:
        await _check_every_tenant(source, with_csv=True)
        await _check_text_tenants(source)
    finally:
        await source.close()


async def test_opensearch_a_full_text_scope_field_fails_the_read_without_naming_it(opensearch_url):
    """A scope column that cannot be matched exactly (full text, no keyword subfield) is not read
    unscoped: the read fails, naming neither the column nor the value."""
    index = f"dp-tenants-text-{uuid.uuid4().hex[:8]}"
    mapping = {"properties": {**data.MAPPING["properties"], "team": {"type": "text"}}}
    data.load_opensearch(opensearch_url, index, ROWS[:20], mapping)
    source = OpenSearchSource(data.dataset("opensearch", opensearch_url, index, scope="team", claim="team"))
    try:
        query = build_query(source.dataset, scope="acme")
        for read in (source.count(query), _rows(source, query)):
            with pytest.raises(SourceError) as e:
                await read
            assert "acme" not in str(e.value) and "team" not in str(e.value)
        assert await source.count(build_query(source.dataset, scope=NO_ROWS)) == 0
    finally:
        await source.close()
        data.drop_opensearch(opensearch_url, index)


async def test_readiness_checks_a_scoped_dataset_reading_no_tenants_rows(sqlite_path):
    """``/readyz`` has no caller to scope by: it checks a scoped dataset with no rows, and it does
    not refuse it for having no scope value (``ScopeMissing``)."""
    from types import SimpleNamespace

    from api.readiness import Readiness

    ds = data.dataset("sqlite", sqlite_path, "rows")
    counted: list[Any] = []

    class Source(SqliteSource):
        async def count(self, query, cap=None):
            counted.append(query.scope)
            return await super().count(query, cap)

    services = SimpleNamespace(registry=SimpleNamespace(open=Source))
    await Readiness._dataset(services, ds)
    assert counted == [TenantScope(ds.by_name["org"], None, nothing=True)]
    with pytest.raises(SourceError):
        await Readiness._dataset(services, replace(ds, table="missing"))
