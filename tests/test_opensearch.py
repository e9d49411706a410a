"""The OpenSearch source on a real (osmem) server: the same rows as SQLite for every filter, sorts
with missing values where SQL puts NULLs, typed cells, flattened objects, released points in time
and scrolls, and retries against a real HTTP proxy that fails on purpose."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp import web
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opensearchpy import OpenSearch, helpers
from opensearchpy.exceptions import NotFoundError

import tests.test_query as sql_cases
from dataport.errors import UserErrors
from dataport.net import free_port
from sources.base import Column, Dataset, SourceError, TransientSourceError
from sources.opensearch import Field, OpenSearchSource, compile_query, discover_columns
from sources.query import build_query

# The rows of tests/test_query.py, plus a text field with a keyword subfield and an object field.
COLUMNS = (
    *sql_cases.COLUMNS,
    Column("title", "string"),
    Column("loc.site", "string"),
    Column("loc.depth", "float"),
)
MAPPING = {
    "properties": {
        "id": {"type": "long"},
        "name": {"type": "keyword"},
        "score": {"type": "double"},
        "active": {"type": "boolean"},
        "born": {"type": "date", "format": "yyyy-MM-dd"},
        "seen_at": {"type": "date"},
        "notes": {"type": "text"},
        "title": {"type": "text", "fields": {"keyword": {"type": "keyword"}}},
        "loc": {"properties": {"site": {"type": "keyword"}, "depth": {"type": "double"}}},
    }
}
EXTRA = {  # id -> (title, loc)
    1: ("Hello World", {"site": "a*b", "depth": 10}),
    2: ("hello", {"site": "a?b", "depth": 2.5}),
    3: ("Zebra", {"site": "a\\b"}),
    4: (None, {"site": "axb", "depth": -1.0}),
    5: ("apple", None),
}


def _document(row: tuple) -> dict[str, Any]:
    id_, name, score, active, born, seen_at, notes = row
    doc = {
        "id": id_,
        "name": name,
        "score": score,
        "active": None if active is None else bool(active),
        "born": born,
        "seen_at": seen_at,
        "notes": notes,
    }
    title, loc = EXTRA[id_]
    doc["title"], doc["loc"] = title, loc
    if id_ == 3:
        doc["score"] = 3  # an integer in JSON for a float column comes out as a float
        del doc["active"], doc["born"]  # missing fields and explicit nulls are both SQL's NULL
    return doc


def _client(url: str) -> OpenSearch:
    return OpenSearch(hosts=[url])


_CREATED: list[tuple[str, str]] = []  # (url, index), deleted when the module ends


@pytest.fixture(scope="module", autouse=True)
def _delete_created_indices() -> Iterator[None]:
    yield
    for url, name in _CREATED:
        client = _client(url)
        client.indices.delete(index=name, ignore_unavailable=True)
        client.close()
    _CREATED.clear()


def _create(url: str, index: str, mapping: dict, documents: list[tuple[str, dict]]) -> None:
    _CREATED.append((url, index))
    client = _client(url)
    try:
        client.indices.create(index=index, body={"mappings": mapping})
        helpers.bulk(client, ({"_index": index, "_id": i, "_source": d} for i, d in documents), refresh=True)
    finally:
        client.close()


@pytest.fixture(scope="module")
def index(opensearch_url: str) -> str:
    name = f"dp-test-{uuid.uuid4().hex[:8]}"
    _create(opensearch_url, name, MAPPING, [(str(r[0]), _document(r)) for r in sql_cases.ROWS])
    return name


def _dataset(url: str, index: str, key: tuple[str, ...] = ("id",), columns=COLUMNS) -> Dataset:
    return Dataset(name="os", source="opensearch", url=url, table=index, columns=columns, key=key)


@pytest.fixture(scope="module")
def dataset(opensearch_url: str, index: str) -> Dataset:
    return _dataset(opensearch_url, index)


@pytest.fixture
async def source(dataset: Dataset) -> AsyncIterator[OpenSearchSource]:
    s = OpenSearchSource(dataset, None, page_rows=2)  # small pages: every test crosses page boundaries
    yield s
    await s.close()


async def _rows(source: OpenSearchSource, batch_rows: int = 2, **kwargs) -> list[tuple]:
    query = build_query(source.dataset, **kwargs)
    return [row async for batch in source.batches(query, batch_rows) for row in batch]


async def _ids(source: OpenSearchSource, **kwargs) -> list[int]:
    return [row[0] for row in await _rows(source, columns=["id"], **kwargs)]


# -- filters, sorts, limits: the same answers as SQL -------------------------------------------


@pytest.mark.parametrize(("filters", "expected"), sql_cases.FILTER_CASES)
async def test_filters_match_sqlite(source, filters, expected):
    assert await _ids(source, filters=filters) == expected


@pytest.mark.parametrize(("filters", "expected"), sql_cases.FILTER_CASES)
async def test_filters_match_sqlite_without_a_key(opensearch_url, index, filters, expected):
    # no key: no total order, so the scroll path (sorted by _doc) is taken
    s = OpenSearchSource(_dataset(opensearch_url, index, key=()), None, page_rows=2)
    try:
        assert sorted(await _ids(s, filters=filters)) == expected
    finally:
        await s.close()


@pytest.mark.parametrize(
    ("value", "expected"),
    [("a*b", [1]), ("*", [1]), ("?", [2]), ("a?b", [2]), ("\\", [3]), ("a\\b", [3]), ("x", [4]), ("", [1, 2, 3, 4])],
)
async def test_contains_matches_wildcard_characters_literally(source, value, expected):
    assert await _ids(source, filters=[{"field": "loc.site", "op": "CONTAINS", "value": value}]) == expected


async def test_prefix_and_equality_on_wildcard_characters(source):
    assert await _ids(source, filters=[{"field": "loc.site", "op": "PREFIX", "value": "a*"}]) == [1]
    assert await _ids(source, filters=[{"field": "loc.site", "op": "EQ", "value": "a?b"}]) == [2]
    assert await _ids(source, filters=[{"field": "loc.site", "op": "NE", "value": "a?b"}]) == [1, 3, 4, 5]


async def test_a_text_field_is_filtered_and_sorted_through_its_keyword_subfield(source):
    # exact and case-sensitive, as in SQL; the analysed text would match "hello" for "Hello World"
    assert await _ids(source, filters=[{"field": "title", "op": "EQ", "value": "hello"}]) == [2]
    assert await _ids(source, filters=[{"field": "title", "op": "PREFIX", "value": "Hel"}]) == [1]
    assert await _ids(source, filters=[{"field": "title", "op": "CONTAINS", "value": "o W"}]) == [1]
    assert await _ids(source, sort=[{"field": "title"}]) == [1, 3, 5, 2, 4]


async def test_a_text_field_without_keyword_is_refused_with_a_user_error(opensearch_url, index):
    # declared filterable by hand, but the index holds only analysed text
    columns = tuple(Column("notes", "string") if c.name == "notes" else c for c in COLUMNS)
    s = OpenSearchSource(_dataset(opensearch_url, index, columns=columns), None)
    try:
        query = build_query(
            s.dataset,
            columns=["id"],
            filters=[{"field": "id", "op": "GT", "value": 0}, {"field": "notes", "op": "EQ", "value": "x"}],
        )
        with pytest.raises(UserErrors) as e:
            await s.count(query)
        assert [(x.code, x.field) for x in e.value.errors] == [("NOT_FILTERABLE", ("input", "filters", "1", "field"))]
        with pytest.raises(UserErrors) as e:
            await s.count(build_query(s.dataset, sort=[{"field": "notes"}]))
        assert e.value.errors[0].code == "NOT_SORTABLE"
        # IS_NULL needs no keyword: whether the field exists is known for text too
        assert await _ids(s, filters=[{"field": "notes", "op": "IS_NULL"}]) == [2]
    finally:
        await s.close()


async def test_sorts_put_missing_values_where_sql_puts_nulls(source):
    assert await _ids(source, sort=[{"field": "score"}]) == [4, 1, 5, 3, 2]
    assert await _ids(source, sort=[{"field": "score", "direction": "DESC"}]) == [2, 3, 1, 5, 4]
    assert await _ids(source, sort=[{"field": "born", "direction": "DESC"}], limit=2) == [3, 2]
    assert await _ids(source, sort=[{"field": "name"}]) == [3, 1, 2, 4, 5]  # code-point order, as SQLite
    assert await _ids(source, sort=[{"field": "active"}]) == [2, 5, 1, 4, 3]  # false, true, missing
    assert await _ids(source, sort=[{"field": "active", "direction": "DESC"}]) == [3, 1, 4, 2, 5]
    assert await _ids(source, sort=[{"field": "seen_at", "direction": "DESC"}]) == [3, 2, 1, 5, 4]
    assert await _ids(source, sort=[{"field": "loc.depth"}, {"field": "score", "direction": "DESC"}]) == [
        4, 2, 1, 3, 5]  # fmt: skip


async def test_the_key_breaks_ties_in_every_page(dataset):
    query = build_query(dataset, columns=["id"], sort=[{"field": "born"}])
    # 1 and 5 share a date: the key orders them, also when a page boundary falls between them
    for page_rows in (1, 2, 3, None):
        s = OpenSearchSource(dataset, page_rows=page_rows)
        try:
            assert [r[0] async for b in s.batches(query, 2) for r in b] == [4, 1, 5, 2, 3]
        finally:
            await s.close()
    fields = {"born": Field("born", "date"), "id": Field("id", "long")}  # as the mapping says
    assert compile_query(query, fields)["sort"] == [
        {"born": {"order": "asc", "missing": "_last"}},
        {"id": {"order": "asc", "missing": "_last"}},
    ]


async def test_limit_stops_the_read(source):
    assert await _ids(source, limit=1) == [1]
    assert await _ids(source, limit=3) == [1, 2, 3]  # across pages of 2
    assert await _ids(source, limit=99) == [1, 2, 3, 4, 5]
    assert await _ids(source, sort=[{"field": "score", "direction": "DESC"}], limit=4) == [2, 3, 1, 5]


async def test_a_large_page_is_handed_out_in_batches(dataset):
    s = OpenSearchSource(dataset)  # pages sized by a cell budget: all five documents in one request
    try:
        assert [len(b) async for b in s.batches(build_query(dataset), 2)] == [2, 2, 1]
        assert [len(b) async for b in s.batches(build_query(dataset, limit=3), 2)] == [2, 1]
    finally:
        await s.close()


async def test_count_is_capped(source, dataset):
    assert await source.count(build_query(dataset)) == 5
    assert await source.count(build_query(dataset), cap=3) == 3
    assert await source.count(build_query(dataset), cap=6) == 5
    assert await source.count(build_query(dataset, limit=2)) == 2
    assert await source.count(build_query(dataset, limit=4), cap=3) == 3
    assert await source.count(build_query(dataset, filters=[{"field": "score", "op": "NE", "value": 1.5}])) == 3


async def test_datetimes_compare_as_instants_to_the_millisecond(opensearch_url):
    index = f"dp-ms-{uuid.uuid4().hex[:8]}"
    _create(
        opensearch_url,
        index,
        {"properties": {"id": {"type": "long"}, "t": {"type": "date"}}},
        [("1", {"id": 1, "t": "2020-01-01T09:00:00.123Z"}), ("2", {"id": 2, "t": "2020-01-01T10:00:00.124+01:00"})],
    )
    s = OpenSearchSource(_dataset(opensearch_url, index, columns=(Column("id", "integer"), Column("t", "datetime"))))
    try:

        async def ids(op: str, value: Any) -> list[int]:
            key = "values" if isinstance(value, list) else "value"
            return await _ids(s, filters=[{"field": "t", "op": op, key: value}])

        # finer than the milliseconds the field keeps: compared exactly, as PostgreSQL would
        assert await ids("LT", "2020-01-01T09:00:00.1235Z") == [1]
        assert await ids("LTE", "2020-01-01T09:00:00.1229Z") == []
        assert await ids("GT", "2020-01-01T09:00:00.1229Z") == [1, 2]
        assert await ids("GTE", "2020-01-01T09:00:00.1235Z") == [2]
        assert await ids("EQ", "2020-01-01T09:00:00.1231Z") == []
        assert await ids("NE", "2020-01-01T09:00:00.1231Z") == [1, 2]
        assert await ids("BETWEEN", ["2020-01-01T09:00:00.1225Z", "2020-01-01T09:00:00.1235Z"]) == [1]
        assert await ids("IN", ["2020-01-01T09:00:00.1231Z"]) == []
        assert await ids("NOT_IN", ["2020-01-01T09:00:00.1231Z"]) == [1, 2]
        # whole milliseconds, and offsets
        assert await ids("EQ", "2020-01-01T09:00:00.124Z") == [2]
        assert await ids("EQ", "2020-01-01T10:00:00.123+01:00") == [1]
        assert await ids("IN", ["2020-01-01T09:00:00.123Z", "2020-01-01T09:00:00.124Z"]) == [1, 2]
        assert await ids("NOT_IN", ["2020-01-01T09:00:00.124Z"]) == [1]
    finally:
        await s.close()


# -- cells ---------------------------------------------------------------------------------------


async def test_rows_are_typed_and_objects_flattened(source):
    rows = await _rows(source)
    assert rows[0] == (1, "alpha", 1.5, True, "2020-01-01", "2020-01-01T10:00:00Z", "x", "Hello World", "a*b", 10.0)
    assert rows[2] == (3, "Alphabet", 3.0, None, None, None, "y", "Zebra", "a\\b", None)
    assert rows[4] == (5, None, 1.5, False, "2020-01-01", "2020-01-01T09:00:00Z", "w", "apple", None, None)
    assert [type(r[2]) for r in rows if r[2] is not None] == [float] * 4
    assert [type(r[9]) for r in rows if r[9] is not None] == [float] * 3
    # columns come back in the order asked for
    assert (await _rows(source, columns=["loc.site", "id", "active"]))[1] == ("a?b", 2, False)


async def test_datetimes_are_normalised_and_dates_kept(opensearch_url):
    index = f"dp-cells-{uuid.uuid4().hex[:8]}"
    mapping = {"properties": {"id": {"type": "long"}, "t": {"type": "date"},
                              "d": {"type": "date", "format": "yyyy-MM-dd"}, "tags": {"type": "keyword"}}}  # fmt: skip
    docs = [
        ({"id": 1, "t": "2019-07-07T23:59:59+01:00", "d": "2019-07-07", "tags": ["one"]}, "2019-07-07T22:59:59Z"),
        ({"id": 2, "t": "2020-01-01T09:00:00.120Z", "tags": []}, "2020-01-01T09:00:00.12Z"),
        ({"id": 3, "t": "2020-01-01T10:00"}, "2020-01-01T10:00:00Z"),
        ({"id": 4, "t": 1577872800000}, "2020-01-01T10:00:00Z"),
        ({"id": 5, "t": "2020-01-01"}, "2020-01-01T00:00:00Z"),
    ]
    _create(opensearch_url, index, mapping, [(str(d["id"]), d) for d, _ in docs])
    columns = (Column("id", "integer"), Column("t", "datetime"), Column("d", "date"), Column("tags", "string"))
    s = OpenSearchSource(_dataset(opensearch_url, index, columns=columns))
    try:
        rows = await _rows(s)
        assert [r[1] for r in rows] == [expected for _, expected in docs]
        assert rows[0][2:] == ("2019-07-07", "one")  # a one-value array is that value
        assert rows[1][3] is None  # an empty array is no value
    finally:
        await s.close()


async def test_arrays_of_objects_and_literal_dotted_keys_flatten_too(opensearch_url):
    index = f"dp-flat-{uuid.uuid4().hex[:8]}"
    mapping = {
        "properties": {
            "id": {"type": "long"},
            "loc": {"properties": {"site": {"type": "keyword"}, "depth": {"type": "double"}}},
        }
    }
    _create(opensearch_url, index, mapping, [
        ("1", {"id": 1, "loc": [{"site": "one", "depth": 1}]}),  # an array of one object
        ("2", {"id": 2, "loc.site": "dotted", "loc": {"depth": 2.5}}),  # a literal dotted key
        ("3", {"id": 3, "loc": {"site": None}}),
        ("4", {"id": 4, "loc": [{"site": "x"}, {"site": "y"}]}),  # two values: not one cell
    ])  # fmt: skip
    columns = (Column("id", "integer"), Column("loc.site"), Column("loc.depth", "float"))
    s = OpenSearchSource(_dataset(opensearch_url, index, columns=columns))
    try:
        assert await _rows(s, filters=[{"field": "id", "op": "LT", "value": 4}]) == [
            (1, "one", 1.0),
            (2, "dotted", 2.5),
            (3, None, None),
        ]
        with pytest.raises(SourceError, match=r"Document '4' .*column 'loc.site' holds 2 values \['x', 'y'\]"):
            await _rows(s)
    finally:
        await s.close()


async def test_a_value_of_the_wrong_type_names_the_document_and_column(opensearch_url):
    index = f"dp-bad-{uuid.uuid4().hex[:8]}"
    _create(
        opensearch_url,
        index,
        {"properties": {"id": {"type": "long"}, "v": {"type": "keyword"}}},
        [("a", {"id": 1, "v": "1.5"}), ("b", {"id": 2, "v": "oops"})],
    )
    # the index keeps text; the dataset says the column holds floats
    s = OpenSearchSource(_dataset(opensearch_url, index, columns=(Column("id", "integer"), Column("v", "float"))))
    try:
        with pytest.raises(SourceError, match=r"Document 'a' in index '.*': column 'v' holds '1.5', which is not a fl"):
            await _rows(s)
    finally:
        await s.close()

    index = f"dp-many-{uuid.uuid4().hex[:8]}"
    _create(
        opensearch_url,
        index,
        {"properties": {"id": {"type": "long"}, "tags": {"type": "keyword"}}},
        [("a", {"id": 1, "tags": ["x", "y"]})],
    )
    s = OpenSearchSource(_dataset(opensearch_url, index, columns=(Column("id", "integer"), Column("tags", "string"))))
    try:
        with pytest.raises(SourceError, match=r"Document 'a' .*column 'tags' holds 2 values"):
            await _rows(s)
    finally:
        await s.close()


# -- discovery -----------------------------------------------------------------------------------


def test_discover_reads_the_mapping_with_dotted_object_fields(opensearch_url, index):
    columns = discover_columns(opensearch_url, index)
    assert [(c.name, c.type, c.filterable, c.sortable) for c in columns] == [
        ("active", "boolean", True, True),
        ("born", "date", True, True),
        ("id", "integer", True, True),
        ("loc.depth", "float", True, True),
        ("loc.site", "string", True, True),
        ("name", "string", True, True),
        ("notes", "string", False, False),  # text without a keyword subfield
        ("score", "float", True, True),
        ("seen_at", "datetime", True, True),
        ("title", "string", True, True),  # text with a keyword subfield
    ]
    assert discover_columns(opensearch_url, index) == columns  # deterministic


async def test_a_discovered_dataset_reads_like_a_declared_one(opensearch_url, index):
    s = OpenSearchSource(_dataset(opensearch_url, index, columns=discover_columns(opensearch_url, index)))
    try:
        rows = await _rows(
            s, columns=["id", "loc.site", "title"], filters=[{"field": "title", "op": "PREFIX", "value": "Hel"}]
        )
        assert rows == [(1, "a*b", "Hello World")]
    finally:
        await s.close()


def test_discover_reports_a_missing_index_or_server(opensearch_url):
    with pytest.raises(SourceError, match="Index 'no-such-index' does not exist"):
        discover_columns(opensearch_url, "no-such-index")
    with pytest.raises(SourceError, match="could not be reached"):
        discover_columns(f"http://127.0.0.1:{free_port()}", "anything")


# -- points in time and scrolls are released -------------------------------------------------------


def _open_pits(url: str) -> set[str]:
    client = _client(url)
    try:
        return {p["pit_id"] for p in client.get_all_pits()["pits"]}
    finally:
        client.close()


def _scroll_alive(url: str, scroll_id: str) -> bool:
    client = _client(url)
    try:
        client.scroll(body={"scroll_id": scroll_id, "scroll": "1m"})
        return True
    except NotFoundError:
        return False
    finally:
        client.close()


async def test_a_point_in_time_is_released_after_a_full_read_and_an_early_close(source, dataset, opensearch_url):
    before = _open_pits(opensearch_url)
    query = build_query(dataset, columns=["id"])
    assert [r[0] async for b in source.batches(query, 2) for r in b] == [1, 2, 3, 4, 5]
    assert _open_pits(opensearch_url) == before

    reader = source.batches(query, 2)
    assert await anext(reader) == [(1,), (2,)]
    assert len(_open_pits(opensearch_url) - before) == 1  # read through a point in time
    started = time.monotonic()
    await reader.aclose()  # the client went away
    assert time.monotonic() - started < 1
    assert _open_pits(opensearch_url) == before


async def test_a_scroll_is_released_after_a_full_read_and_an_early_close(opensearch_url, index):
    s = OpenSearchSource(_dataset(opensearch_url, index, key=()), page_rows=2)
    try:
        query = build_query(s.dataset, columns=["id"])
        reader = s.batches(query, 2)
        assert await anext(reader) == [(1,), (2,)]
        scroll_id = s._cursors[0].id
        assert s._cursors[0].kind == "scroll" and _scroll_alive(opensearch_url, scroll_id)
        # _scroll_alive took the second page itself: the reader carries on with the third
        assert [r[0] async for b in reader for r in b] == [5]
        assert not _scroll_alive(opensearch_url, scroll_id)

        reader = s.batches(query, 2)
        await anext(reader)
        scroll_id = s._cursors[0].id
        started = time.monotonic()
        await reader.aclose()
        assert time.monotonic() - started < 1
        assert not s._cursors and not _scroll_alive(opensearch_url, scroll_id)
    finally:
        await s.close()


async def test_a_cancelled_export_releases_its_point_in_time(dataset, opensearch_url):
    before = _open_pits(opensearch_url)
    s = OpenSearchSource(dataset, page_rows=2)
    got_one = asyncio.Event()

    async def export() -> None:
        async for _ in s.batches(build_query(dataset), 1):
            got_one.set()
            await asyncio.sleep(60)  # a slow writer

    task = asyncio.create_task(export())
    await asyncio.wait_for(got_one.wait(), 5)
    assert len(_open_pits(opensearch_url) - before) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    started = time.monotonic()
    await s.close()  # the worker closes the source: whatever is still open is given back
    assert time.monotonic() - started < 1
    assert _open_pits(opensearch_url) == before


# -- failures, through a real HTTP proxy that misbehaves on purpose ------------------------------------


async def test_a_cancel_during_a_page_request_releases_the_point_in_time_at_once(proxy, index, opensearch_url):
    before = _open_pits(opensearch_url)
    s = OpenSearchSource(_dataset(proxy.url, index), page_rows=2)
    try:
        reader = s.batches(build_query(s.dataset, columns=["id"]), 2)
        assert await anext(reader) == [(1,), (2,)]
        proxy.fault_paths, proxy.faults, proxy.hang_seconds = ("/_search",), ["hang"], 3.0
        pending = asyncio.ensure_future(anext(reader))  # the next page never comes
        await asyncio.sleep(0.2)
        assert len(_open_pits(opensearch_url) - before) == 1
        started = time.monotonic()
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert time.monotonic() - started < 1
        assert _open_pits(opensearch_url) == before and not s._cursors
    finally:
        await s.close()


class FaultyProxy:
    """An HTTP server in front of osmem. ``faults`` are answered instead of forwarding, one per
    matching request (a status, or "hang" to answer only after ``hang_seconds``)."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.faults: list[int | str] = []
        self.fault_paths: tuple[str, ...] = ("",)  # a request is faulted when its path contains one of these
        self.hang_seconds = 5.0
        self.requests: list[tuple[str, str, int]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> FaultyProxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self._session = aiohttp.ClientSession()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._session:
            await self._session.close()
        if self._runner:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.faults and any(p in request.path for p in self.fault_paths):
            fault = self.faults.pop(0)
            if fault == "hang":
                await asyncio.sleep(self.hang_seconds)
                fault = 504
            self.requests.append((request.method, request.path, int(fault)))
            return web.json_response(
                {"error": {"type": "es_rejected_execution_exception" if fault == 429 else "proxy_error",
                           "reason": f"injected {fault}"}, "status": fault},
                status=int(fault),
            )  # fmt: skip
        assert self._session is not None
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=await request.read(),
            headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
        ) as upstream:  # fmt: skip
            body = await upstream.read()
            self.requests.append((request.method, request.path, upstream.status))
            return web.Response(body=body, status=upstream.status, content_type="application/json")


@pytest.fixture
async def proxy(opensearch_url) -> AsyncIterator[FaultyProxy]:
    p = await FaultyProxy(opensearch_url).start()
    yield p
    await p.stop()


FAST = (0.02, 0.04, 0.08)


async def test_429_and_5xx_are_retried_with_backoff_then_succeed(proxy, index):
    s = OpenSearchSource(_dataset(proxy.url, index), retry_delays=FAST)
    try:
        proxy.faults = [429, 503, 502]  # three failures, the fourth try answers
        assert await s.count(build_query(s.dataset)) == 5
        assert [status for _, _, status in proxy.requests][:4] == [429, 503, 502, 200]
        proxy.faults = [429, 500]
        assert await _ids(s) == [1, 2, 3, 4, 5]
    finally:
        await s.close()


async def test_a_failure_that_lasts_is_a_transient_error_after_four_tries_over_about_five_seconds(proxy, index):
    s = OpenSearchSource(_dataset(proxy.url, index))  # the real backoff
    try:
        proxy.faults = [503] * 10
        started = time.monotonic()
        with pytest.raises(TransientSourceError, match=r"failed 4 times while .* over \d+\.\d s .*503"):
            await s.count(build_query(s.dataset))
        assert 3 < time.monotonic() - started < 8
        assert len(proxy.requests) == 4
    finally:
        await s.close()


async def test_timeouts_and_refused_connections_are_retried_then_transient(proxy, index):
    s = OpenSearchSource(_dataset(proxy.url, index), retry_delays=FAST, timeout=0.3)
    proxy.hang_seconds = 1.0
    try:
        proxy.faults = ["hang"]  # the first try times out, the second answers
        assert await s.count(build_query(s.dataset)) == 5
        proxy.faults = ["hang"] * 4
        with pytest.raises(TransientSourceError, match="failed 4 times.*no answer in time"):
            await s.count(build_query(s.dataset))
    finally:
        await s.close()
    s = OpenSearchSource(_dataset(f"http://127.0.0.1:{free_port()}", index), retry_delays=FAST)
    try:
        with pytest.raises(TransientSourceError, match="failed 4 times.*connection failed"):
            await _ids(s)
    finally:
        await s.close()


async def test_pages_of_a_point_in_time_are_retried(proxy, index):
    s = OpenSearchSource(_dataset(proxy.url, index), retry_delays=FAST, page_rows=2)
    try:
        reader = s.batches(build_query(s.dataset, columns=["id"]), 2)
        assert await anext(reader) == [(1,), (2,)]
        proxy.faults = [502, 429]  # search_after pages are idempotent: any transient failure is retried
        assert [r[0] async for b in reader for r in b] == [3, 4, 5]
    finally:
        await s.close()


async def test_a_scroll_page_is_retried_only_when_it_cannot_have_been_served(proxy, index):
    s = OpenSearchSource(_dataset(proxy.url, index, key=()), retry_delays=FAST, page_rows=2)
    proxy.fault_paths = ("/_search/scroll",)
    try:
        query = build_query(s.dataset, columns=["id"])
        proxy.faults = [429, 429]  # refused before any work: the same page is asked again
        assert [r[0] async for b in s.batches(query, 2) for r in b] == [1, 2, 3, 4, 5]
        proxy.faults = [502]  # the page may have been served: replaying it could skip rows
        with pytest.raises(TransientSourceError, match="a scroll cannot be resumed"):
            await _ids(s)
        assert not s._cursors  # the broken scroll was still cleared
        assert [p for m, p, _ in proxy.requests if m == "DELETE"] == ["/_search/scroll"] * 2
    finally:
        await s.close()


async def test_a_cluster_without_point_in_time_is_read_with_a_scroll(proxy, index):
    s = OpenSearchSource(_dataset(proxy.url, index), retry_delays=FAST, page_rows=2)
    proxy.fault_paths = ("/_search/point_in_time",)
    proxy.faults = [400]  # as a cluster older than OpenSearch 2.4 answers
    try:
        assert await _ids(s, sort=[{"field": "score", "direction": "DESC"}]) == [2, 3, 1, 5, 4]
        assert await _ids(s, sort=[{"field": "born"}], limit=3) == [4, 1, 5]
        assert not s._cursors
        paths = [p for _, p, _ in proxy.requests]
        assert paths.count(f"/{index}/_search/point_in_time") == 1  # asked once, then remembered
        assert "/_search/scroll" in paths
    finally:
        await s.close()


async def test_a_missing_index_is_a_source_error_that_says_so(opensearch_url):
    s = OpenSearchSource(_dataset(opensearch_url, "no-such-index"))
    try:
        with pytest.raises(SourceError, match="Index 'no-such-index' does not exist") as e:
            await s.count(build_query(s.dataset))
        assert not isinstance(e.value, TransientSourceError)
        with pytest.raises(SourceError, match="Index 'no-such-index' does not exist"):
            await _ids(s)
    finally:
        await s.close()


def test_the_query_dsl(dataset):
    query = build_query(dataset, columns=["id", "loc.site"], filters=[
        {"field": "score", "op": "NE", "value": 1.5},
        {"field": "name", "op": "CONTAINS", "value": "a*b?c\\"},
        {"field": "title", "op": "IS_NULL", "value": False},
        {"field": "born", "op": "BETWEEN", "values": ["2020-01-01", "2020-12-31"]},
    ], sort=[{"field": "score", "direction": "DESC"}])  # fmt: skip
    assert compile_query(query) == {
        "query": {"bool": {
            "filter": [
                {"wildcard": {"name": {"value": "*a\\*b\\?c\\\\*"}}},
                {"exists": {"field": "title"}},
                {"range": {"born": {"gte": "2020-01-01", "lte": "2020-12-31", "format": "strict_date"}}},
            ],
            "must_not": [{"term": {"score": 1.5}}],
        }},
        "sort": [{"score": {"order": "desc", "missing": "_first", "unmapped_type": "double"}},
                 {"id": {"order": "asc", "missing": "_last", "unmapped_type": "long"}}],
        "_source": {"includes": ["id", "loc.site"]},
    }  # fmt: skip
    assert "query" not in compile_query(build_query(dataset))  # no filters: match_all, the default


# -- a long read in key order, and the page reader -------------------------------------------------------


SORTS = [
    None,
    [{"field": "born"}],
    [{"field": "score", "direction": "DESC"}],
    [{"field": "loc.depth"}],
    [{"field": "active", "direction": "DESC"}, {"field": "name"}],
]


async def test_a_long_read_in_key_order_is_one_sorted_scroll_with_the_same_rows(dataset, opensearch_url):
    # pages of 2: a read of 5 documents takes 3 pages, more than pit_max_pages=1 allows a point in time
    pit = OpenSearchSource(dataset, page_rows=2)
    s = OpenSearchSource(dataset, page_rows=2, pit_max_pages=1)
    before = _open_pits(opensearch_url)
    try:
        for sort in SORTS:
            for limit in (None, 3):
                query = build_query(dataset, sort=sort, limit=limit)
                expected = [r async for b in pit.batches(query, 2) for r in b]
                assert [r async for b in s.batches(query, 2) for r in b] == expected, (sort, limit)

        reader = s.batches(build_query(dataset, columns=["id"]), 2)
        assert await anext(reader) == [(1,), (2,)]
        assert [c.kind for c in s._cursors] == ["scroll"] and _open_pits(opensearch_url) == before
        scroll_id = s._cursors[0].id
        started = time.monotonic()
        await reader.aclose()
        assert time.monotonic() - started < 1
        assert not s._cursors and not _scroll_alive(opensearch_url, scroll_id)
        # a short read (the count says so) keeps the point in time
        reader = s.batches(build_query(dataset, columns=["id"], limit=2), 2)
        assert await anext(reader) == [(1,), (2,)]
        assert [c.kind for c in s._cursors] == ["pit"]
        await reader.aclose()
        assert [r[0] async for b in s.batches(build_query(dataset, columns=["id"], limit=2), 1) for r in b] == [1, 2]
    finally:
        await s.close()
        await pit.close()
    assert _open_pits(opensearch_url) == before


async def test_a_helper_killed_mid_read_fails_it_as_transient_and_releases_the_scroll(opensearch_url, pools):
    import signal

    index = f"dp-kill-{uuid.uuid4().hex[:8]}"
    _create(
        opensearch_url, index, {"properties": {"id": {"type": "long"}}}, [(str(i), {"id": i}) for i in range(1, 201)]
    )
    s = OpenSearchSource(
        _dataset(opensearch_url, index, key=(), columns=(Column("id", "integer"),)), page_rows=2, helpers_after_cells=0
    )
    try:
        reader = s.csv_batches(build_query(s.dataset), 2, formula_guard=True)
        assert (await anext(reader))[1] == 0 and (await anext(reader))[1] == 2
        scroll_id = s._cursors[0].id
        for pid in pools[0].pool._processes:  # as the OOM killer would
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(TransientSourceError, match="helper process of this read ended unexpectedly"):
            async for _ in reader:
                pass
        assert not s._cursors and not _scroll_alive(opensearch_url, scroll_id)
    finally:
        await s.close()


async def test_the_first_request_goes_out_while_the_helpers_start(opensearch_url, index, pools):
    """The helpers take ~0.1 s to start: the cluster is asked for the first page meanwhile, not after."""
    s = OpenSearchSource(_dataset(opensearch_url, index), page_rows=2, pit_max_pages=0, helpers_after_cells=0)
    search = s.client.search
    helpers_up: list[bool] = []  # at each search: whether the read's helpers had started

    async def watched(*args, **kwargs):
        helpers_up.append(pools[-1].pool is not None)
        return await search(*args, **kwargs)

    query = build_query(s.dataset, columns=["id"])
    try:
        await s.count(query)  # as the api counts when the export is requested
        s.client.search = watched  # type: ignore[method-assign]
        chunks = [c async for c in s.csv_batches(query, 2, formula_guard=True)]
        assert helpers_up == [False]
        assert b"".join(c for c, _ in chunks).split(b"\r\n")[1:4] == [b"1", b"2", b"3"]
        assert not s._cursors
    finally:
        await s.close()


async def test_a_count_made_earlier_plans_the_read_without_counting_again(dataset):
    query = build_query(dataset, columns=["id"])
    for counted, kind, counts_made in ((None, "pit", 1), (1000, "scroll", 0)):
        s = OpenSearchSource(dataset, page_rows=2, pit_max_pages=4)
        made: list[int | None] = []
        count = s.count
        s.count = lambda q, cap=None, count=count, made=made: made.append(cap) or count(q, cap)  # type: ignore
        try:
            if counted is not None:  # 500 pages: more than a point in time is kept for
                await s.counted(query, counted)
            reader = s.batches(query, 2)
            assert await anext(reader) == [(1,), (2,)]
            assert [c.kind for c in s._cursors] == [kind] and len(made) == counts_made
            await reader.aclose()
        finally:
            await s.close()


async def test_a_cancel_during_a_scroll_page_releases_the_scroll_at_once(proxy, index, opensearch_url):
    s = OpenSearchSource(_dataset(proxy.url, index), page_rows=2, pit_max_pages=1)
    try:
        reader = s.batches(build_query(s.dataset, columns=["id"]), 2)
        assert await anext(reader) == [(1,), (2,)]
        scroll_id = s._cursors[0].id
        proxy.fault_paths, proxy.faults, proxy.hang_seconds = ("/_search/scroll",), ["hang"], 3.0
        pending = asyncio.ensure_future(anext(reader))  # the next page (asked for ahead) never comes
        await asyncio.sleep(0.2)
        started = time.monotonic()
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert time.monotonic() - started < 1
        assert not s._cursors and not _scroll_alive(opensearch_url, scroll_id)
    finally:
        await s.close()


async def test_csv_batches_write_the_bytes_the_csv_writer_writes_for_the_rows(dataset):
    from formats.csv import CsvWriter

    s = OpenSearchSource(dataset, page_rows=2)
    try:
        for columns in (None, ["loc.site", "id", "title", "active"], ["score"]):
            for formula_guard in (True, False):
                query = build_query(dataset, columns=columns, sort=[{"field": "score", "direction": "DESC"}])
                writer = CsvWriter(query.columns, formula_guard=formula_guard)
                rows = [r async for b in s.batches(query, 3) for r in b]
                chunks = [c async for c in s.csv_batches(query, 3, formula_guard=formula_guard)]
                assert b"".join(c for c, _ in chunks) == writer.begin() + writer.write(rows), (columns, formula_guard)
                assert [n for _, n in chunks] == [0, 2, 2, 1]  # the header, then pages of 2 in batches of 3
    finally:
        await s.close()


@pytest.fixture
def pools(monkeypatch) -> list:
    """Every helper pool a read starts, in order (to look at its processes)."""
    from sources.helpers import HelperPool

    started: list[HelperPool] = []
    begin = HelperPool.begin
    monkeypatch.setattr(HelperPool, "begin", lambda self: started.append(self) or begin(self))
    return started


@pytest.mark.parametrize("key", [("id",), ()], ids=["key", "no-key"])
@pytest.mark.parametrize("pit_max_pages", [0, 100], ids=["scroll", "pit"])
async def test_csv_from_helper_processes_is_the_csv_made_in_process(
    opensearch_url, index, key, pit_max_pages, monkeypatch
):
    """A large CSV read hands each page's bytes to helper processes; the file is the same, page for
    page, whatever the columns, order, limit or guard."""
    from sources.helpers import HelperPool

    submitted: list[int] = []
    submit = HelperPool.submit
    monkeypatch.setattr(HelperPool, "submit", lambda self, rows, *a: submitted.append(rows) or submit(self, rows, *a))
    dataset = _dataset(opensearch_url, index, key=key)
    flat = [c.name for c in dataset.columns if "." not in c.name]
    queries = [
        build_query(dataset),
        build_query(dataset, columns=flat),
        build_query(dataset, columns=["loc.site", "title", "id"]),
        build_query(dataset, columns=flat, sort=[{"field": "score", "direction": "DESC"}]),
        build_query(dataset, columns=["name", "born"], limit=3),
    ]
    in_process = OpenSearchSource(dataset, page_rows=2, pit_max_pages=pit_max_pages, helpers_after_cells=10**12)
    helped = OpenSearchSource(dataset, page_rows=2, pit_max_pages=pit_max_pages, helpers_after_cells=0)
    try:
        for query in queries:
            for formula_guard in (True, False):
                expected = [c async for c in in_process.csv_batches(query, 3, formula_guard=formula_guard)]
                submitted.clear()
                chunks = [c async for c in helped.csv_batches(query, 3, formula_guard=formula_guard)]
                assert chunks == expected, (query.columns, formula_guard)
                # every page with hits went to a helper (pages of 2 rows; 5 rows, or 3 with the limit)
                assert submitted == [2, 2, 1] if query.limit is None else submitted == [2, 1]
        assert not in_process._cursors and not helped._cursors
    finally:
        await in_process.close()
        await helped.close()


async def test_a_bad_cell_met_in_a_helper_names_the_document_and_an_early_close_stops_the_helpers(
        opensearch_url, index, pools):  # fmt: skip
    bad = f"dp-bad-{uuid.uuid4().hex[:8]}"
    _create(
        opensearch_url,
        bad,
        {"properties": {"id": {"type": "long"}, "v": {"type": "keyword"}}},
        [(str(i), {"id": i, "v": "2.5"}) for i in range(1, 41)],
    )
    columns = (Column("id", "integer"), Column("v", "float"))  # the index keeps text
    s = OpenSearchSource(
        _dataset(opensearch_url, bad, columns=columns), page_rows=2, pit_max_pages=0, helpers_after_cells=0
    )
    try:
        with pytest.raises(SourceError, match=r"Document '1' in index '.*': column 'v' holds '2.5', which is not a"):
            async for _ in s.csv_batches(build_query(s.dataset), 2, formula_guard=True):
                pass
        assert not s._cursors
    finally:
        await s.close()

    # 20 pages: the read runs a few pages ahead of the chunks taken, not to the end
    s = OpenSearchSource(
        _dataset(opensearch_url, bad, key=(), columns=(Column("id", "integer"),)), page_rows=2, helpers_after_cells=0
    )
    try:
        reader = s.csv_batches(build_query(s.dataset), 2, formula_guard=True)
        assert (await anext(reader))[1] == 0  # the header
        assert (await anext(reader))[1] == 2
        processes = [psutil.Process(pid) for pid in pools[-1].pool._processes]
        scroll_id = s._cursors[0].id
        started = time.monotonic()
        await reader.aclose()
        assert time.monotonic() - started < 1
        assert not s._cursors and not _scroll_alive(opensearch_url, scroll_id)
        assert pools[-1].pool is None and not pools[-1].pending
        gone, alive = psutil.wait_procs(processes, timeout=5)
        assert len(processes) == 2 and not alive
    finally:
        await s.close()


@pytest.mark.parametrize("pit_max_pages", [0, 100], ids=["scroll", "pit"])
async def test_pages_decoded_into_typed_structs_give_the_rows_dicts_give(dataset, pit_max_pages, monkeypatch):
    """Answers, the first one's too, are decoded straight into typed Structs: the same rows as
    parsing every page into dicts, through a scroll and through a point in time."""
    from sources.opensearch.decoding import PageReader

    flat = [c.name for c in dataset.columns if "." not in c.name]
    queries = [
        build_query(dataset, columns=flat),
        build_query(dataset, columns=flat, sort=[{"field": "score"}]),
        build_query(dataset, columns=flat, limit=5),
    ]
    typed_pages: list[int] = []
    typed = PageReader.typed
    monkeypatch.setattr(PageReader, "typed", lambda self, hits: typed_pages.append(len(hits)) or typed(self, hits))
    s = OpenSearchSource(dataset, page_rows=2, pit_max_pages=pit_max_pages)
    try:
        read = [[r async for b in s.batches(q, 3) for r in b] for q in queries]
        assert sum(typed_pages) == sum(len(rows) for rows in read)  # every page
        monkeypatch.setattr(PageReader, "decode", lambda self, answer: None)
        assert read == [[r async for b in s.batches(q, 3) for r in b] for q in queries]
    finally:
        await s.close()


def test_the_page_reader_learns_the_order_of_keys_from_the_first_document_of_an_answer():
    """The first answer is decoded typed: the order of the documents' keys is read from the first
    hit alone. A first document too long to read so is parsed with its page, as dicts; the next
    answer is decoded typed."""
    from sources.opensearch.decoding import _LEARN_WINDOW, PageReader

    columns = (Column("s", "string"), Column("n", "integer"))

    def answer(*sources: Any) -> bytes:
        return json.dumps(
            {
                "_scroll_id": "x",
                "hits": {"hits": [{"_id": str(i), "_source": source} for i, source in enumerate(sources)]},
            }
        ).encode()

    read = PageReader(columns)
    page = read.decode(answer({"n": 1, "s": "a"}, {"s": "b"}))
    assert page is not None and read.typed(page.hits.hits) == [("a", "b"), (1, None)]
    assert read._order == [1, 0]  # "n" first, as in the documents

    long = "x" * _LEARN_WINDOW
    read = PageReader(columns)
    first = answer({"s": long, "n": 2}, {"s": "c", "n": 3})
    assert read.decode(first) is None
    assert [list(c) for c in read(json.loads(first)["hits"]["hits"])] == [[long, "c"], [2, 3]]
    page = read.decode(answer({"s": "d", "n": 4}))
    assert page is not None and read.typed(page.hits.hits) == [("d",), (4,)]


FLAT = (
    Column("f", "float"),
    Column("i", "integer"),
    Column("s", "string"),
    Column("b", "boolean"),
    Column("d", "date"),
    Column("t", "datetime"),
)


@pytest.mark.parametrize(
    "columns",
    [FLAT, (*FLAT, Column("o.x", "float"), Column("o.y", "string")), FLAT[2:3]],
    ids=["fields", "and-objects", "one-column"],
)
def test_the_page_reader_types_cells_as_the_row_converter_does(columns):
    """Both ways of the page reader (dicts, and typed pages decoded from the answer's bytes) give
    the cells the row converter gives, of the same types."""
    from sources.opensearch.cells import BadCell, cell_converter
    from sources.opensearch.decoding import PageReader

    odd = {
        "f": [3, [2.5], [], None, 1e300],
        "i": [2.0, [7], None, 2**70],
        "s": [True, 5, 1.5, ["a"], [], "=x"],
        "b": ["true", "false", [False], None],
        "d": ["2020-W01-1", 1577872800000, ["2020-01-02"], "2020-01-31"],
        "t": [
            "2020-01-01T10:00",
            1577872800000,
            "2020-01-01T10:00:00+01:00",
            "2010-01-01T000517.1Z",
            "2020-01-01T10:00:00Z",
        ],
    }
    plain = {
        "f": [1.5, None],
        "i": [1, None],
        "s": ["x", None],
        "b": [True, None],
        "d": ["2020-01-01", None],
        "t": ["2020-01-01T10:00:00Z", None],
    }
    pages = []
    for values in (plain, odd):
        for name in values:  # one column with odd values at a time, then all at once
            pages.append(
                [
                    {"_source": {**{k: v[n % len(v)] for k, v in plain.items()}, name: v}}
                    for n, v in enumerate(values[name])
                ]
            )
        pages.append([{"_source": {k: v[n % len(v)] for k, v in values.items()}} for n in range(7)])
    pages.append(
        [
            {"_source": {"o": {"x": 1}, "o.y": "dotted"}},
            {"_source": {"o": [{"x": 2.5, "y": "a"}]}},
            {"_id": "3"},
            {"_source": {"o": None}},
        ]
    )
    read, convert = PageReader(columns), cell_converter(columns)

    def typed(cells) -> list[list[tuple[type, Any]]]:
        return [[(type(v), v) for v in c] for c in cells]

    decoded = refused = 0
    for hits in pages:
        expected = typed(zip(*convert(hits), strict=True))
        assert typed(read(hits)) == expected, hits
        # after a first page, an answer's bytes may be decoded straight into typed pages
        page = read.decode(json.dumps({"_shards": {"failed": 0}, "hits": {"hits": hits}}).encode())
        if page is None:  # a value of another type: the answer is read as dicts
            refused += 1
            continue
        try:
            cells = read.typed(page.hits.hits)
        except BadCell:  # a date that does not parse: read as dicts, whose error names the document
            refused += 1
            continue
        assert typed(cells) == expected, hits
        decoded += 1
    assert (decoded > 5 and refused > 3) if len(columns) > 1 and "o.x" not in read.empty else decoded == 0
    bad = [
        {"_id": "a", "_index": "i", "_source": {"s": "x", "i": 1}},
        {"_id": "b", "_index": "i", "_source": {"s": ["p", "q"], "i": "y"}},
    ]
    with pytest.raises(SourceError, match=r"Document 'b' in index 'i': column '[si]' holds"):
        read(bad)
    assert read([]) == [[] for _ in columns]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.none(), st.text(alphabet="0123456789-W/T０", min_size=8, max_size=11), st.dates().map(dt.date.isoformat)
        ),
        max_size=6,
    )
)
@example(["2020-W01-1"])
@example(["2020-02-30"])
@example(["２０２０-01-01"])
@example(["2020-01-02", None, "2021-12-31"])
def test_the_column_check_of_dates_keeps_exactly_what_the_cell_converter_keeps(values):
    """A page's date column is passed as it is only when every cell is what ``_date`` would give
    back unchanged: the week date 2020-W01-1, full-width digits and 2020-02-30 are not."""
    from sources.opensearch.cells import BadCell, _date
    from sources.opensearch.decoding import _checked_dates

    def kept(value):
        try:
            return _date(value) == value
        except BadCell:
            return False

    assert _checked_dates(values) == all(kept(v) for v in values), values


def test_a_helper_writes_each_answer_as_the_csv_writer_writes_its_rows():
    """What a helper process does with an answer's bytes, run here: the first page (dicts), typed
    pages after it, and pages that go back to dicts (a value of another type, a number beyond a
    double, which msgspec and orjson refuse and the standard parser reads as infinity)."""
    import gc

    from formats.csv import CsvWriter
    from sources.opensearch import cells, rendering

    columns = (
        Column("i", "integer"),
        Column("f", "float"),
        Column("s"),
        Column("b", "boolean"),
        Column("d", "date"),
        Column("t", "datetime"),
    )
    plain = {"i": 1, "f": 2.5, "s": "=x", "b": True, "d": "2020-01-02", "t": "2020-01-02T03:04:05Z"}
    answers = [
        [plain, {**plain, "f": None, "s": None}],
        [{**plain, "f": 1e-7, "s": 'a,"b"'}, {**plain, "i": -(2**63)}],
        [{**plain, "f": 3}, {**plain, "d": "2020-W01-1"}],
        [{**plain, "f": "1e400"}, plain],
    ]  # "1e400" is written bare, below
    try:
        rendering._start_rendering(columns, True)
        writer = CsvWriter(columns, formula_guard=True)
        convert = cells.cell_converter(columns)
        for sources in answers:
            hits = [{"_id": str(n), "_source": source} for n, source in enumerate(sources)]
            answer = json.dumps({"_shards": {"failed": 0}, "hits": {"hits": hits}}).replace('"1e400"', "1e400")
            rows = convert(json.loads(answer)["hits"]["hits"])
            assert rendering._render(answer.encode(), len(hits)) == writer.write(rows), sources
            assert rendering._render(answer.encode(), 1) == writer.write(rows[:1]), sources
        assert b"inf" in writer.write(rows)
    finally:
        gc.enable()  # the helper's initializer turns the collector off for good


def test_documents_are_read_whole_only_when_the_mapping_lists_all_they_can_hold():
    from sources.opensearch import _source_fields

    def answer(**mappings) -> dict:
        return {"ix": {"mappings": mappings}}

    props = {
        "id": {"type": "long"},
        "loc": {"properties": {"site": {"type": "keyword"}}},
        "t": {"type": "text", "fields": {"keyword": {"type": "keyword"}}},
        "a": {"type": "alias", "path": "id"},
    }
    assert _source_fields(answer(properties=props)) == {"id", "loc.site", "t"}
    assert _source_fields(answer(properties=props, dynamic="strict")) == {"id", "loc.site", "t"}
    assert _source_fields(
        {
            "a": {"mappings": {"properties": {"x": {"type": "long"}}}},
            "b": {"mappings": {"properties": {"y": {"type": "long"}}}},
        }
    ) == {"x", "y"}
    assert _source_fields(answer(properties=props, dynamic=False)) is None
    assert _source_fields(answer(properties={**props, "o": {"properties": {}, "dynamic": "false"}})) is None
    assert _source_fields(answer(properties={**props, "o": {"type": "object", "enabled": False}})) is None
    assert _source_fields(answer(properties={**props, "n": {"type": "nested", "properties": {}}})) is None
    assert _source_fields(answer(properties=props, _source={"excludes": ["t"]})) is None
    # an object that turns dynamic mapping back on inside one that has it off is still not listed whole
    assert (
        _source_fields(
            answer(
                properties={
                    "o": {
                        "dynamic": False,
                        "properties": {"p": {"dynamic": True, "properties": {"x": {"type": "long"}}}},
                    }
                }
            )
        )
        is None
    )
