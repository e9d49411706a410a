"""Property tests: one query means the same rows, in the same order, from every source.

The same random rows are loaded into SQLite, PostgreSQL and OpenSearch (real servers); hypothesis
draws filters, sorts and limits over them; every source must return exactly SQLite's answer.
"""

from __future__ import annotations

import datetime as dt
import random
import sqlite3
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opensearchpy import OpenSearch, helpers

from dataport.errors import UserErrors
from dataport.settings import Settings
from sources.base import Column, Dataset, iso_datetime
from sources.opensearch import OpenSearchSource
from sources.postgres import PostgresSource
from sources.query import build_query
from sources.sqlite import SqliteSource

COLUMNS = (
    Column("id", "integer"),
    Column("n", "integer"),
    Column("x", "float"),
    Column("s", "string"),
    Column("b", "boolean"),
    Column("d", "date"),
    Column("t", "datetime"),
)
# A small alphabet makes duplicates, prefixes and substrings likely; the odd characters test
# escaping (wildcards, quotes, backslashes) and code-point ordering.
TEXTS = ["", "a", "ab", "abc", "b", "B", "ba", "a*b", "a?c", "x\\y", "it's", 'say "hi"', "Ørsted", "é", "z z", "%", "_"]
ROW_COUNT = 120


def _rows(seed: int, count: int) -> list[tuple]:
    rnd = random.Random(seed)

    def maybe(value):
        return None if rnd.random() < 0.15 else value

    base = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    return [
        (
            i,
            maybe(rnd.randint(-3, 3)),
            maybe(rnd.choice([-1.5, 0.0, 0.25, 1.0, 2.5, 1e6, -1e-3])),
            maybe(rnd.choice(TEXTS)),
            maybe(rnd.random() < 0.5),
            maybe((base + dt.timedelta(days=rnd.randint(0, 40))).date().isoformat()),
            maybe(iso_datetime(base + dt.timedelta(hours=rnd.randint(0, 200)))),
        )
        for i in range(1, count + 1)
    ]


ROWS = _rows(seed=11, count=ROW_COUNT)


def _dataset(name: str, source: str, url: str, table: str) -> Dataset:
    return Dataset(name=name, source=source, url=url, table=table, columns=COLUMNS, key=("id",))


@pytest.fixture(scope="module")
async def sources(tmp_path_factory, postgres_db, opensearch_url) -> AsyncIterator[dict[str, Any]]:
    table = f"agree_{uuid.uuid4().hex[:8]}"
    # SQLite: the reference.
    path = tmp_path_factory.mktemp("agree") / "agree.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(
            f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, n INTEGER, x REAL, s TEXT, b INTEGER, d TEXT, t TEXT)"
        )
        conn.executemany(f"INSERT INTO {table} VALUES (?,?,?,?,?,?,?)", ROWS)
    # PostgreSQL, with a linguistic collation on the text column (ICU root: 'a' < 'B'), as many
    # production databases have: text order must still be code-point order, as in SQLite.
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {table} (id integer PRIMARY KEY, n integer, x double precision, "
            f"s text, b boolean, d date, t timestamptz)"
        )
        for collation in ("und-x-icu", "en-x-icu", "en_US.utf8"):  # servers built without ICU have none
            try:
                conn.execute(f'ALTER TABLE {table} ALTER COLUMN s TYPE text COLLATE "{collation}"')
                break
            except psycopg.Error:
                continue
        with conn.cursor().copy(f"COPY {table} FROM STDIN") as copy:
            for row in ROWS:
                copy.write_row(row)
    # OpenSearch.
    client = OpenSearch(opensearch_url)
    client.indices.create(
        index=table,
        body={
            "mappings": {
                "properties": {
                    "id": {"type": "long"},
                    "n": {"type": "long"},
                    "x": {"type": "double"},
                    "s": {"type": "keyword"},
                    "b": {"type": "boolean"},
                    "d": {"type": "date", "format": "yyyy-MM-dd"},
                    "t": {"type": "date"},
                }
            }
        },
    )
    helpers.bulk(
        client,
        (
            {
                "_index": table,
                "_id": str(row[0]),
                "_source": {c.name: v for c, v in zip(COLUMNS, row, strict=True) if v is not None},
            }
            for row in ROWS
        ),
        refresh=True,
    )
    client.close()
    config = Settings()
    opened = {
        "sqlite": SqliteSource(_dataset("agree", "sqlite", str(path), table)),
        "postgres": PostgresSource(_dataset("agree", "postgres", postgres_db, table), config),
        "opensearch": OpenSearchSource(_dataset("agree", "opensearch", opensearch_url, table), config),
    }
    yield opened
    for source in opened.values():
        await source.close()


# -- strategies: filters that make sense for each column type --------------------------------


def _values(column: Column) -> st.SearchStrategy:
    index = [c.name for c in COLUMNS].index(column.name)
    seen = sorted({r[index] for r in ROWS if r[index] is not None}, key=repr)
    extra = {
        "integer": st.integers(-5, 5),
        "float": st.sampled_from([-2.0, 0.1, 1.0, 3.0]),
        "string": st.sampled_from(TEXTS + ["a", "Ø", "*", "\\"]),
        "boolean": st.booleans(),
        "date": st.sampled_from(["2020-01-05", "2020-02-01"]),
        "datetime": st.sampled_from(["2020-01-03T00:00:00Z", "2020-01-05T12:30:00+02:00"]),
    }[column.type]
    return st.one_of(st.sampled_from(seen), extra)


@st.composite
def filters(draw) -> dict[str, Any]:
    column = draw(st.sampled_from(COLUMNS[1:]))
    ops = ["EQ", "NE", "IN", "NOT_IN", "IS_NULL"]
    if column.type != "boolean":
        ops += ["GT", "GTE", "LT", "LTE", "BETWEEN"]
    if column.type == "string":
        ops += ["CONTAINS", "PREFIX"]
    op = draw(st.sampled_from(ops))
    values = _values(column)
    if op == "IS_NULL":
        return {"field": column.name, "op": op, "value": draw(st.booleans())}
    if op == "BETWEEN":
        low, high = draw(values), draw(values)
        return {"field": column.name, "op": op, "values": [low, high]}
    if op in ("IN", "NOT_IN"):
        return {"field": column.name, "op": op, "values": draw(st.lists(values, min_size=1, max_size=4))}
    return {"field": column.name, "op": op, "value": draw(values)}


sorts = st.lists(
    st.builds(
        lambda c, d: {"field": c.name, "direction": d}, st.sampled_from(COLUMNS[1:]), st.sampled_from(["ASC", "DESC"])
    ),
    max_size=2,
    unique_by=lambda s: s["field"],
)


async def _read(source, query) -> list[tuple]:
    return [row async for batch in source.batches(query, 37) for row in batch]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chosen=st.lists(filters(), max_size=3), order=sorts, limit=st.one_of(st.none(), st.integers(1, 60)))
async def test_every_source_returns_the_same_rows_in_the_same_order(sources, chosen, order, limit):
    dataset = sources["sqlite"].dataset
    try:
        query = build_query(dataset, None, chosen, order, limit)
    except UserErrors:
        return  # refused the same way everywhere: validation happens before any source
    expected = await _read(sources["sqlite"], query)
    for name in ("postgres", "opensearch"):
        got = await _read(sources[name], query)
        assert got == expected, (name, chosen, order, limit)
        assert await sources[name].count(query) == len(expected), name


# anyOf: one to three groups of one to three filters, beside zero to two plain filters.
groups = st.lists(st.lists(filters(), min_size=1, max_size=3).map(lambda fs: {"filters": fs}), min_size=1, max_size=3)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chosen=st.lists(filters(), max_size=2), any_of=groups, order=sorts, limit=st.one_of(st.none(), st.integers(1, 60))
)
async def test_any_of_groups_give_the_same_rows_on_every_source(sources, chosen, any_of, order, limit):
    """(AND of filters) AND (OR of AND-groups): every source returns SQLite's rows, and SQLite's
    rows are exactly those that the plain filters and at least one whole group let through."""
    dataset = sources["sqlite"].dataset
    try:
        query = build_query(dataset, None, chosen, order, limit, any_of=any_of)
    except UserErrors:
        return
    expected = await _read(sources["sqlite"], query)
    for name in ("postgres", "opensearch"):
        got = await _read(sources[name], query)
        assert got == expected, (name, chosen, any_of, order, limit)
        assert await sources[name].count(query) == len(expected), name
    # The reference itself: the union of each group's rows, read as plain filters, within the limit.
    ids: set[int] = set()
    for group in any_of:
        alone = build_query(dataset, None, [*chosen, *group["filters"]], order)
        ids |= {row[0] for row in await _read(sources["sqlite"], alone)}
    everything = await _read(sources["sqlite"], build_query(dataset, None, chosen, order))
    assert expected == [row for row in everything if row[0] in ids][:limit]


async def test_the_rows_are_typed_alike(sources):
    query = build_query(sources["sqlite"].dataset)
    reference = await _read(sources["sqlite"], query)
    assert reference == [tuple(r) for r in ROWS]
    for name in ("postgres", "opensearch"):
        assert await _read(sources[name], query) == reference, name
