"""The export query: validation errors name the field, and SQLite returns exactly the rows asked for."""

from __future__ import annotations

import sqlite3

import pytest

from dataport.errors import UserErrors
from sources.base import Column, Dataset, SourceError
from sources.query import MAX_IN_VALUES, build_query
from sources.sqlite import SqliteSource

COLUMNS = (
    Column("id", "integer"),
    Column("name", "string"),
    Column("score", "float"),
    Column("active", "boolean"),
    Column("born", "date"),
    Column("seen_at", "datetime"),
    Column("notes", "string", filterable=False, sortable=False),
)
ROWS = [
    (1, "alpha", 1.5, 1, "2020-01-01", "2020-01-01T10:00:00Z", "x"),
    (2, "beta", None, 0, "2021-05-05", "2021-05-05T00:00:00Z", None),
    (3, "Alphabet", 3.0, None, None, None, "y"),
    (4, "gamma", -2.0, 1, "2019-07-07", "2019-07-07T23:59:59Z", "z"),
    (5, None, 1.5, 0, "2020-01-01", "2020-01-01T09:00:00Z", "w"),
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Dataset:
    path = tmp_path_factory.mktemp("q") / "q.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, score REAL, active INTEGER, born TEXT, "
        "seen_at TEXT, notes TEXT)"
    )
    conn.executemany("INSERT INTO t VALUES (?,?,?,?,?,?,?)", ROWS)
    conn.commit()
    conn.close()
    return Dataset(name="t", source="sqlite", url=str(path), table="t", columns=COLUMNS, key=("id",))


def _errors(dataset, **kwargs) -> list[tuple[str, tuple[str, ...]]]:
    with pytest.raises(UserErrors) as e:
        build_query(dataset, **kwargs)
    return [(x.code, x.field) for x in e.value.errors]


def test_each_bad_input_names_its_field(dataset):
    assert _errors(dataset, columns=["id", "nope"]) == [("UNKNOWN_COLUMN", ("input", "columns", "1"))]
    assert _errors(dataset, columns=["id", "id"]) == [("DUPLICATE_COLUMN", ("input", "columns", "1"))]
    assert _errors(dataset, columns=[]) == [("NO_COLUMNS", ("input", "columns"))]
    assert _errors(dataset, limit=0) == [("INVALID_LIMIT", ("input", "limit"))]
    assert _errors(dataset, filters=[{"field": "notes", "op": "EQ", "value": "x"}]) == [
        ("NOT_FILTERABLE", ("input", "filters", "0", "field"))
    ]
    assert _errors(dataset, sort=[{"field": "notes"}]) == [("NOT_SORTABLE", ("input", "sort", "0", "field"))]
    assert _errors(dataset, filters=[{"field": "score", "op": "CONTAINS", "value": "1"}]) == [
        ("UNSUPPORTED_OPERATOR", ("input", "filters", "0", "op"))
    ]
    assert _errors(dataset, filters=[{"field": "score", "op": "BETWEEN", "values": [1]}]) == [
        ("INVALID_FILTER_VALUE", ("input", "filters", "0", "values"))
    ]
    assert _errors(dataset, filters=[{"field": "born", "op": "GT", "value": "2020-13-45"}]) == [
        ("INVALID_FILTER_VALUE", ("input", "filters", "0", "value"))
    ]
    assert _errors(dataset, filters=[{"field": "id", "op": "IN", "values": list(range(MAX_IN_VALUES + 1))}]) == [
        ("TOO_MANY_VALUES", ("input", "filters", "0", "values"))
    ]
    assert _errors(dataset, filters=[{"field": "score", "op": "EQ", "value": "abc"}]) == [
        ("INVALID_FILTER_VALUE", ("input", "filters", "0", "value"))
    ]
    # several problems at once are all reported
    assert len(_errors(dataset, columns=["nope"], limit=-1, filters=[{"field": "x", "op": "EQ", "value": 1}])) == 3


async def _ids(dataset, **kwargs) -> list[int]:
    query = build_query(dataset, columns=["id"], **kwargs)
    source = SqliteSource(dataset)
    return [row[0] async for batch in source.batches(query, 2) for row in batch]


# Every operator on every column type, with the ids each must return (other sources import this).
FILTER_CASES = [
    ([{"field": "score", "op": "EQ", "value": 1.5}], [1, 5]),
    ([{"field": "score", "op": "NE", "value": 1.5}], [2, 3, 4]),  # NE keeps nulls
    ([{"field": "score", "op": "GT", "value": 1.5}], [3]),
    ([{"field": "score", "op": "GTE", "value": "1.5"}], [1, 3, 5]),
    ([{"field": "score", "op": "LT", "value": 0}], [4]),
    ([{"field": "score", "op": "BETWEEN", "values": [0, 2]}], [1, 5]),
    ([{"field": "id", "op": "IN", "values": [2, 4, 9]}], [2, 4]),
    ([{"field": "id", "op": "NOT_IN", "values": [2, 4]}], [1, 3, 5]),
    ([{"field": "name", "op": "CONTAINS", "value": "pha"}], [1, 3]),
    ([{"field": "name", "op": "PREFIX", "value": "Alph"}], [3]),  # case-sensitive
    ([{"field": "name", "op": "IS_NULL"}], [5]),
    ([{"field": "name", "op": "IS_NULL", "value": False}], [1, 2, 3, 4]),
    ([{"field": "active", "op": "EQ", "value": True}], [1, 4]),
    ([{"field": "born", "op": "GTE", "value": "2020-01-01"}], [1, 2, 5]),
    ([{"field": "seen_at", "op": "LT", "value": "2020-01-01T09:30:00+00:00"}], [4, 5]),
    ([{"field": "seen_at", "op": "LT", "value": "2020-01-01T10:30:00+01:00"}], [4, 5]),  # = 09:30Z
    ([{"field": "name", "op": "EQ", "value": "x' OR '1'='1"}], []),  # bound, never spliced
]


@pytest.mark.parametrize(("filters", "expected"), FILTER_CASES)
async def test_filters_on_sqlite(dataset, filters, expected):
    assert await _ids(dataset, filters=filters) == expected


async def test_sort_is_stable_with_nulls_last_ascending(dataset):
    assert await _ids(dataset, sort=[{"field": "score"}]) == [4, 1, 5, 3, 2]
    assert await _ids(dataset, sort=[{"field": "score", "direction": "DESC"}]) == [2, 3, 1, 5, 4]
    assert await _ids(dataset, sort=[{"field": "born", "direction": "DESC"}], limit=2) == [3, 2]


async def test_rows_are_typed_and_counted(dataset):
    query = build_query(dataset, columns=["id", "active", "score"])
    rows = [r async for b in SqliteSource(dataset).batches(query, 10) for r in b]
    assert rows[0] == (1, True, 1.5) and rows[1] == (2, False, None) and rows[2] == (3, None, 3.0)
    assert await SqliteSource(dataset).count(query) == 5
    assert await SqliteSource(dataset).count(query, cap=3) == 3
    assert await SqliteSource(dataset).count(build_query(dataset, limit=2)) == 2


async def test_text_in_a_number_column_is_a_clear_source_error(tmp_path):
    path = tmp_path / "bad.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v REAL)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(1, 1.0), (2, "oops")])
    conn.commit()
    conn.close()
    ds = Dataset(
        name="bad",
        source="sqlite",
        url=str(path),
        table="t",
        columns=(Column("id", "integer"), Column("v", "float")),
        key=("id",),
    )
    with pytest.raises(SourceError, match=r"Row 2: column 'v' holds 'oops', which is not a float"):
        async for _ in SqliteSource(ds).batches(build_query(ds), 10):
            pass
