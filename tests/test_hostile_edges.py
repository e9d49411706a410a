"""Hostile and careless input at the edges (issue 15): the streaming route's concurrency and idle
clients, edge values in filters and limits, file names, and uploads that do not match their import.

Each request asserts its exact status or code and that nothing changed: no task queued, no file
stored, the target table as it was. The streaming tests run on a stack of their own (a short idle
timeout, a small overall cap) and use fresh users and X-Forwarded-For addresses, so that they never
trip the per-minute limits.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.client import Api
from tests.fixtures.stack import Stack, TestData, _stack

IDLE_SECONDS = 2
PER_USER = 3
IN_ALL = 6
# What one stalled stream may add to the api's memory (it was ~13 MB, held forever, before issue 15).
PER_STREAM_BYTES = 8 * 2**20
EXPORT = "mutation($i: ExportInput!) { requestExport(input: $i) { task { id } userErrors { field message code } } }"
EXPORTS = "{ exportTasks(first: 5) { totalCount } }"
IMPORTS = "{ importTasks(first: 5) { totalCount } }"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url, test_data) -> Iterator[Stack]:
    yield from _stack(
        "hostile",
        tmp_path_factory,
        redis_url,
        test_data,
        {
            "DATAPORT_STORAGE": "local",
            "DATAPORT_STREAM_IDLE_TIMEOUT_SECONDS": str(IDLE_SECONDS),
            "DATAPORT_STREAM_CONCURRENCY_PER_USER": str(PER_USER),
            "DATAPORT_STREAM_CONCURRENCY": str(IN_ALL),
        },
        workers=1,
    )


def _address() -> str:
    return f"198.51.100.{uuid.uuid4().int % 250}"


def _token(stack: Stack) -> str:
    return stack.token(f"edge-{uuid.uuid4().hex[:8]}")


def _stream(stack: Stack, token: str, **params) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", "X-Forwarded-For": _address()}
    return httpx.get(f"{stack.url}/exports/stream", params=params, headers=headers, timeout=60)


def _gauge(stack: Stack) -> float:
    for line in httpx.get(f"{stack.url}/metrics").text.splitlines():
        if line.startswith("dataport_stream_reads_in_progress "):
            return float(line.split()[1])
    raise AssertionError("no stream gauge")


def _wait_for(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _stalled(stack: Stack, token: str) -> socket.socket:
    """A stream of the 100,000 demo rows whose client reads nothing after the status line."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", stack.port))
    sock.sendall(
        f"GET /exports/stream?dataset=samples_stream&format=json HTTP/1.1\r\nHost: x\r\n"
        f"X-Forwarded-For: {_address()}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    assert sock.recv(12).startswith(b"HTTP/1.1 200")
    return sock


def _api_process(stack: Stack) -> psutil.Process:
    return psutil.Process(stack.processes[0].pid)


def _rss(stack: Stack) -> int:
    process = _api_process(stack)
    return process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True))


def _errors(payload: dict) -> list[tuple[str, list[str]]]:
    return [(e["code"], e["field"]) for e in payload["userErrors"]]


def _export(api: Api, **export_input) -> dict:
    body = api.gql(EXPORT, {"i": {"format": "CSV", **export_input}})
    assert "errors" not in body, body
    payload = body["data"]["requestExport"]
    assert payload["task"] is None
    return payload


def _nothing_queued(api: Api) -> None:
    assert api.data(EXPORTS)["exportTasks"]["totalCount"] == 0
    assert api.data(IMPORTS)["importTasks"]["totalCount"] == 0


# -- the streaming route: concurrency and idle clients -----------------------------------------------------------


def test_the_fourth_stream_of_a_user_is_refused_before_any_byte(stack: Stack):
    token = _token(stack)
    open_streams = [_stalled(stack, token) for _ in range(PER_USER)]
    try:
        _wait_for(lambda: _gauge(stack) == PER_USER, 5, "three streams should hold the source")
        refused = _stream(stack, token, dataset="special", columns="id")
        assert refused.status_code == 429 and refused.headers["content-type"] == "application/json"
        assert refused.json()["error"]["code"] == "RATE_LIMITED" and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["retryAfterSeconds"] == int(refused.headers["retry-after"])
        assert _gauge(stack) == PER_USER  # the refused one opened nothing
        assert _stream(stack, _token(stack), dataset="special", columns="id").status_code == 200  # others may
    finally:
        for sock in open_streams:
            sock.close()
    _wait_for(lambda: _gauge(stack) == 0, 3, "closed streams release their sources")
    assert _stream(stack, token, dataset="special", columns="id").status_code == 200  # slots freed


def test_streams_beyond_the_overall_cap_get_503_and_memory_stays_bounded(stack: Stack):
    warm = [_stalled(stack, _token(stack)) for _ in range(2)]  # first-use allocations are not per stream
    _wait_for(lambda: _gauge(stack) == 2, 5, "two streams should be open")
    time.sleep(0.5)
    for sock in warm:
        sock.close()
    _wait_for(lambda: _gauge(stack) == 0, 3, "closed streams release their sources")
    before = _rss(stack)
    open_streams = []
    try:
        for _ in range(IN_ALL // PER_USER):
            token = _token(stack)
            open_streams += [_stalled(stack, token) for _ in range(PER_USER)]
        _wait_for(lambda: _gauge(stack) == IN_ALL, 5, "all streams should be open")
        time.sleep(1.0)  # every stalled stream has filled its buffers by now
        grown = _rss(stack) - before
        refused = _stream(stack, _token(stack), dataset="special", columns="id")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert int(refused.headers["retry-after"]) >= 1
        print(f"api RSS grew {grown / 2**20:.1f} MiB with {IN_ALL} stalled streams")
        assert grown < IN_ALL * PER_STREAM_BYTES, f"{grown / 2**20:.1f} MiB for {IN_ALL} stalled streams"
    finally:
        for sock in open_streams:
            sock.close()
    _wait_for(lambda: _gauge(stack) == 0, 3, "closed streams release their sources")


def test_a_client_that_reads_nothing_is_dropped_and_its_slot_freed(stack: Stack):
    token = _token(stack)
    open_streams = [_stalled(stack, token) for _ in range(PER_USER)]
    try:
        _wait_for(lambda: _gauge(stack) == PER_USER, 5, "three streams should hold the source")
        assert _stream(stack, token, dataset="special", columns="id").status_code == 429
        stalled_at = time.monotonic()
        _wait_for(lambda: _gauge(stack) == 0, IDLE_SECONDS + 5, "idle streams should be dropped")
        assert time.monotonic() - stalled_at >= IDLE_SECONDS - 0.5
        assert _stream(stack, token, dataset="special", columns="id").status_code == 200  # the slots are free
        # What the dropped client gets when it reads at last: a body cut off, without the last chunk.
        sock = open_streams[0]
        sock.settimeout(10)
        received = bytearray()
        while chunk := sock.recv(1 << 20):
            received += chunk
        assert not received.endswith(b"0\r\n\r\n") and not received.rstrip().endswith(b"]")
    finally:
        for sock in open_streams:
            sock.close()


def test_a_slow_but_steady_reader_is_not_dropped(stack: Stack):
    token = _token(stack)
    with httpx.stream(
        "GET",
        f"{stack.url}/exports/stream",
        params={"dataset": "special", "format": "ndjson"},
        headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": _address()},
    ) as response:
        time.sleep(IDLE_SECONDS + 1)  # the whole small file fits in the buffers: nothing blocks
        assert response.status_code == 200 and len(response.read().splitlines()) == 7


# -- edge values on the streaming route -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "status", "code", "field"),
    [
        ({"limit": str(2**63)}, 400, "INVALID_LIMIT", ["limit"]),
        ({"limit": "1" * 5000}, 400, "INVALID_LIMIT", ["limit"]),
        ({"limit": "0"}, 400, "INVALID_LIMIT", ["limit"]),
        ({"limit": "-1"}, 400, "INVALID_LIMIT", ["limit"]),
        ({"filter": f"id:eq:{2**64}"}, 400, "INVALID_FILTER_VALUE", ["query", "filters", "0", "value"]),
        ({"filter": f"id:gt:{-(2**64)}"}, 400, "INVALID_FILTER_VALUE", ["query", "filters", "0", "value"]),
        ({"filter": "score:lt:NaN"}, 400, "INVALID_FILTER_VALUE", ["query", "filters", "0", "value"]),
        ({"filter": "score:lt:-Infinity"}, 400, "INVALID_FILTER_VALUE", ["query", "filters", "0", "value"]),
        ({"filter": "score:lt:1e999"}, 400, "INVALID_FILTER_VALUE", ["query", "filters", "0", "value"]),
        (
            {"filter": "seen_at:gt:0001-01-01T00:00:00+01:00"},
            400,
            "INVALID_FILTER_VALUE",
            ["query", "filters", "0", "value"],
        ),
        (
            {"filter": "seen_at:lt:9999-12-31T23:59:59-01:00"},
            400,
            "INVALID_FILTER_VALUE",
            ["query", "filters", "0", "value"],
        ),
        ({"filter": ["id:gte:1"] * 101}, 400, "TOO_MANY_VALUES", ["filter"]),
    ],
)
def test_stream_edge_values_are_400_with_a_code(stack: Stack, params, status, code, field):
    before = _gauge(stack)
    response = _stream(stack, _token(stack), dataset="special", columns="id", **params)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == (code, field)
    assert len(error["message"]) < 400  # the input is not echoed whole
    assert _gauge(stack) == before  # no source was opened for it


def test_stream_dates_before_the_year_1000_compare_as_dates(stack: Stack):
    """SQLite keeps date-times as text: the bound must be zero-padded (0999-…), or every row sorts
    before it."""
    response = _stream(
        stack, _token(stack), dataset="special", columns="id", format="ndjson", filter="seen_at:lt:0999-01-01T00:00:00Z"
    )
    assert response.status_code == 200 and response.text == ""


# -- edge values through requestExport, on every source ------------------------------------------------------------


SOURCES = ("special", "special_pg", "special_os")


@pytest.mark.parametrize("dataset", SOURCES)
@pytest.mark.parametrize(
    ("filt", "field"),
    [
        ({"field": "id", "op": "EQ", "value": 2**64}, "value"),
        ({"field": "id", "op": "GT", "value": -(2**64)}, "value"),
        ({"field": "count", "op": "IN", "values": [1, 2**63]}, "values"),
        ({"field": "count", "op": "EQ", "value": "1" * 4301}, "value"),
        ({"field": "score", "op": "GT", "value": "NaN"}, "value"),
        ({"field": "score", "op": "LT", "value": "Infinity"}, "value"),
        ({"field": "score", "op": "LT", "value": "1e400"}, "value"),
        ({"field": "seen_at", "op": "GT", "value": "0001-01-01T00:00:00+01:00"}, "value"),
        ({"field": "seen_at", "op": "LT", "value": "9999-12-31T23:59:59-01:00"}, "value"),
        ({"field": "name", "op": "EQ", "value": "nul\x00inside"}, "value"),
    ],
)
def test_request_export_edge_values_are_user_errors(stack: Stack, dataset, filt, field):
    api = stack.api()
    payload = _export(api, dataset=dataset, filters=[filt])
    assert _errors(payload) == [("INVALID_FILTER_VALUE", ["input", "filters", "0", field])]
    _nothing_queued(api)


@pytest.mark.parametrize("dataset", SOURCES)
def test_the_extreme_values_that_fit_are_answered_by_every_source(stack: Stack, dataset):
    api = stack.api()
    for filt in (
        {"field": "id", "op": "LT", "value": 2**63 - 1},
        {"field": "id", "op": "GT", "value": -(2**63)},
        {"field": "seen_at", "op": "GT", "value": "0001-01-01T00:00:00Z"},
        {"field": "seen_at", "op": "LT", "value": "9999-12-31T23:59:59Z"},
        {"field": "born", "op": "GT", "value": "0001-01-01"},
    ):
        task, _ = api.run_export(dataset=dataset, format="CSV", columns=["id"], filters=[filt])
        assert task["status"] == "SUCCEEDED" and task["rowCount"] >= 6, (filt, task)


@pytest.mark.parametrize("dataset", SOURCES)
def test_five_thousand_filters_are_too_many_values_not_source_unavailable(stack: Stack, dataset):
    api = stack.api()
    payload = _export(api, dataset=dataset, filters=[{"field": "id", "op": "GTE", "value": i} for i in range(5000)])
    assert _errors(payload) == [("TOO_MANY_VALUES", ["input", "filters"])]
    payload = _export(
        api,
        dataset=dataset,
        filters=[
            {"field": "id", "op": "NOT_IN", "values": list(range(6000))},
            {"field": "count", "op": "IN", "values": list(range(6000))},
        ],
    )
    assert _errors(payload) == [("TOO_MANY_VALUES", ["input", "filters"])]
    _nothing_queued(api)


def test_a_hundred_filters_and_ten_thousand_values_still_work(stack: Stack):
    api = stack.api()
    filters = [{"field": "id", "op": "GTE", "value": 1}] * 99 + [
        {"field": "id", "op": "NOT_IN", "values": list(range(100, 10_100))}
    ]
    task, body = api.run_export(dataset="special", format="CSV", columns=["id"], filters=filters)
    assert task["status"] == "SUCCEEDED" and task["rowCount"] == 7


def test_a_limit_beyond_graphql_int_is_a_coded_error_not_an_internal_one(stack: Stack):
    api = stack.api()
    body = api.gql(EXPORT, {"i": {"format": "CSV", "dataset": "special", "limit": 2**63}})
    assert body.get("data") in (None, {"requestExport": None}) or body["data"]["requestExport"] is None
    assert body["errors"] and "Internal" not in body["errors"][0]["message"], body
    assert "Int cannot represent" in body["errors"][0]["message"]
    assert body["errors"][0]["extensions"]["code"] == "GRAPHQL_VALIDATION_FAILED"
    payload = _export(api, dataset="special", limit=0)
    assert _errors(payload) == [("INVALID_LIMIT", ["input", "limit"])]
    _nothing_queued(api)


# -- file names -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "file_name",
    [
        "x.partial-1.csv",  # the local backend's temp-file suffix
        "東" * 201 + ".csv",  # 200 characters would pass; 607 bytes do not
        "a" * 201,
    ],
)
def test_bad_file_names_are_invalid_file_name(stack: Stack, file_name):
    api = stack.api()
    payload = api.request_import(dataset="imp_sqlite", format="CSV", fileName=file_name)
    assert payload["task"] is None
    assert _errors(payload) == [("INVALID_FILE_NAME", ["input", "fileName"])]
    _nothing_queued(api)


def test_a_name_of_200_bytes_is_taken_and_uploaded(stack: Stack, test_data: TestData):
    api = stack.api()
    ids = _fresh_ids(2)
    name = "é" * 98 + ".csv"  # 196 + 4 bytes
    task = api.start_import("imp_sqlite", _csv(ids), file_name=name)
    assert api.wait_import(task["id"])["status"] == "SUCCEEDED"
    assert _rows(test_data, ids) == ids


# -- uploads that do not match their import ----------------------------------------------------------------------


_next_id = iter(range(7_000_000 + uuid.uuid4().int % 1000 * 1000, 10**9))


def _fresh_ids(n: int) -> list[int]:
    return [next(_next_id) for _ in range(n)]


def _csv(ids: list[int], label: str = "row") -> bytes:
    return ("id,name\r\n" + "".join(f"{i},{label} {i}\r\n" for i in ids)).encode()


def _rows(data: TestData, among: list[int]) -> list[int]:
    conn = sqlite3.connect(data.imports_db)
    try:
        marks = ",".join("?" * len(among))
        return [r[0] for r in conn.execute(f"SELECT id FROM imp WHERE id IN ({marks}) ORDER BY id", among)]
    finally:
        conn.close()


def _names(data: TestData, among: list[int]) -> set[str]:
    conn = sqlite3.connect(data.imports_db)
    try:
        marks = ",".join("?" * len(among))
        return {r[0] for r in conn.execute(f"SELECT name FROM imp WHERE id IN ({marks})", among)}
    finally:
        conn.close()


def _stored(stack: Stack, task_id: str) -> list[Path]:
    """Every file stored under the task's folder, partial ones included."""
    root = stack.data_dir / "files" / "imports"
    return [p for p in root.glob(f"*/{task_id}/**/*") if p.is_file()]


def _waiting(api: Api, content: bytes, **extra) -> dict:
    payload = api.request_import(dataset="imp_sqlite", format="CSV", fileName="rows.csv", **extra)
    assert payload["userErrors"] == [], payload
    return payload["task"]


def test_a_body_larger_than_the_declared_size_is_413_and_nothing_is_kept(stack: Stack):
    api = stack.api()
    content = _csv(_fresh_ids(3))
    task = _waiting(api, content, fileSize=len(content) - 1)
    response = api.upload(task["upload"], content)
    assert response.status_code == 413, response.text
    assert _stored(stack, task["id"]) == []
    assert api.import_task(task["id"])["status"] == "WAITING_FOR_UPLOAD"


def test_a_chunked_body_larger_than_the_declared_size_is_413_while_it_streams(stack: Stack):
    api = stack.api()
    task = _waiting(api, b"", fileSize=1000)
    path = task["upload"]["url"].removeprefix(stack.url)
    with socket.create_connection(("127.0.0.1", stack.port)) as sock:  # no Content-Length: counted as it arrives
        sock.sendall(
            f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Type: text/csv\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        sock.settimeout(10)
        try:
            for _ in range(1000):
                sock.sendall(b"400\r\n" + b"x" * 1024 + b"\r\n")
        except OSError:
            pass  # the server answered and closed while the body was still coming
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert _stored(stack, task["id"]) == []
    assert api.import_task(task["id"])["status"] == "WAITING_FOR_UPLOAD"


def test_start_refuses_a_stored_file_of_another_size_than_declared(stack: Stack, test_data: TestData):
    api = stack.api()
    ids = _fresh_ids(3)
    content = _csv(ids)
    task = _waiting(api, content, fileSize=len(content) + 10)
    assert api.upload(task["upload"], content).status_code == 200
    payload = api.import_mutation("startImport", task["id"])
    assert _errors(payload) == [("FILE_SIZE_MISMATCH", ["id"])]
    assert api.import_task(task["id"])["status"] == "WAITING_FOR_UPLOAD"
    assert [p.name for p in _stored(stack, task["id"])] == ["rows.csv"]  # no sealed copy left behind
    time.sleep(0.5)
    assert _rows(test_data, ids) == []


def test_an_upload_after_the_start_is_409_and_the_import_reads_the_first_file(stack: Stack, test_data: TestData):
    api = stack.api()
    ids = _fresh_ids(3)
    first, second = _csv(ids, "first"), _csv(ids, "second")
    task = _waiting(api, first)
    assert api.upload(task["upload"], first).status_code == 200
    assert api.import_mutation("startImport", task["id"])["userErrors"] == []
    late = api.upload(task["upload"], second)
    assert late.status_code == 409, late.text
    assert api.wait_import(task["id"])["status"] == "SUCCEEDED"
    assert _names(test_data, ids) == {f"first {i}" for i in ids}


def test_an_upload_in_flight_when_the_import_starts_cannot_replace_its_file(stack: Stack, test_data: TestData):
    api = stack.api()
    ids = _fresh_ids(3)
    first = _csv(ids, "first")
    second = _csv(ids, "second") + b"".join(f"{i},second {i}\r\n".encode() for i in _fresh_ids(2000))
    task = _waiting(api, first)
    assert api.upload(task["upload"], first).status_code == 200
    half_sent, go_on, outcome = threading.Event(), threading.Event(), {}

    def slow() -> Iterator[bytes]:
        yield second[:1000]
        half_sent.set()
        go_on.wait(30)
        yield second[1000:]

    def put() -> None:
        outcome["response"] = httpx.put(
            task["upload"]["url"], content=slow(), headers=task["upload"]["headers"], timeout=60
        )

    putter = threading.Thread(target=put)
    putter.start()
    assert half_sent.wait(10)
    time.sleep(0.2)
    assert api.import_mutation("startImport", task["id"])["userErrors"] == []
    go_on.set()
    putter.join(30)
    assert outcome["response"].status_code == 409, outcome["response"].text
    done = api.wait_import(task["id"])
    assert done["status"] == "SUCCEEDED" and done["rowsImported"] == 3
    assert _names(test_data, ids) == {f"first {i}" for i in ids}
    assert not [p for p in _stored(stack, task["id"]) if ".partial-" in p.name]


def test_on_s3_start_refuses_a_size_other_than_declared(s3_stack: Stack):
    api = s3_stack.api()
    content = _csv(_fresh_ids(2))
    payload = api.request_import(dataset="imp_sqlite", format="CSV", fileName="rows.csv", fileSize=len(content) - 1)
    task = payload["task"]
    assert api.upload(task["upload"], content, "rows.csv").status_code in (200, 204)
    started = api.import_mutation("startImport", task["id"])
    assert _errors(started) == [("FILE_SIZE_MISMATCH", ["id"])]
    assert api.import_task(task["id"])["status"] == "WAITING_FOR_UPLOAD"
