"""Imports end to end: ``dataport api`` and ``dataport worker`` processes, real Redis, real local and
SeaweedFS S3 storage, and real SQLite, PostgreSQL and OpenSearch targets (tests/fixtures/stack.py).

Every test imports rows with ids of its own into the ``imp_*`` datasets, so tests never see each
other's rows; the ``rt_*`` datasets stay empty until their round trip.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import itertools
import sqlite3
import time
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from opensearchpy import OpenSearch

from tests.fixtures.stack import EVENTS_SECRET, MAX_UPLOAD_BYTES, SPECIAL_COLUMNS, Stack, TestData

pytestmark = pytest.mark.timeout(180)

HEADER = [c.name for c in SPECIAL_COLUMNS]
SOURCES = ("sqlite", "postgres", "opensearch")
_ids = itertools.count(1_000_000, 10_000)


def fresh_ids(n: int) -> list[int]:
    """Ids no other test uses."""
    start = next(_ids)
    assert n < 10_000
    return list(range(start, start + n))


def csv_bytes(rows: list[list[Any]], header: list[str] = HEADER, newline: str = "\r\n") -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=newline)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def good_rows(ids: list[int]) -> list[list[Any]]:
    return [
        [i, f"row {i}", i / 4, i % 7, "true" if i % 2 else "false", "2024-02-29", "2024-02-29T12:30:00Z", "note"]
        for i in ids
    ]


class Target:
    """Reads one ``imp_*`` dataset's table straight from its store, to check what an import wrote."""

    def __init__(self, data: TestData, source: str, name: str = "imp"):
        self.data, self.source, self.name = data, source, name
        self.dataset = f"{name}_{source}"
        self.table = f"{data.big_table.removesuffix('_big')}_{name}"

    def ids(self, among: list[int]) -> list[int]:
        if self.source == "sqlite":
            with sqlite3.connect(self.data.imports_db) as conn:
                marks = ",".join("?" * len(among))
                return sorted(r[0] for r in conn.execute(f"SELECT id FROM {self.name} WHERE id IN ({marks})", among))
        if self.source == "postgres":
            with psycopg.connect(self.data.postgres_url) as conn:
                return sorted(r[0] for r in conn.execute(f"SELECT id FROM {self.table} WHERE id = ANY(%s)", [among]))
        client = OpenSearch(self.data.opensearch_url)
        try:
            client.indices.refresh(index=self.table)
            found = client.search(index=self.table, body={"query": {"terms": {"id": among}}, "size": 10_000})
            return sorted(hit["_source"]["id"] for hit in found["hits"]["hits"])
        finally:
            client.close()

    def names(self, among: list[int]) -> dict[int, str | None]:
        if self.source == "sqlite":
            with sqlite3.connect(self.data.imports_db) as conn:
                marks = ",".join("?" * len(among))
                return dict(conn.execute(f"SELECT id, name FROM {self.name} WHERE id IN ({marks})", among))
        if self.source == "postgres":
            with psycopg.connect(self.data.postgres_url) as conn:
                return dict(conn.execute(f"SELECT id, name FROM {self.table} WHERE id = ANY(%s)", [among]).fetchall())
        client = OpenSearch(self.data.opensearch_url)
        try:
            client.indices.refresh(index=self.table)
            found = client.search(index=self.table, body={"query": {"terms": {"id": among}}, "size": 10_000})
            return {h["_source"]["id"]: h["_source"].get("name") for h in found["hits"]["hits"]}
        finally:
            client.close()


@pytest.fixture(params=["local", "s3"])
def stack(request) -> Stack:
    return request.getfixturevalue(f"{request.param}_stack")


# -- the happy path, on both storage backends and every store ---------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
def test_import_writes_every_row_and_reports_progress(stack: Stack, test_data: TestData, source: str):
    api = stack.api()
    ids = fresh_ids(50)
    content = csv_bytes(good_rows(ids))
    task = api.run_import(f"imp_{source}", content, fileSize=len(content))
    assert task["status"] == "SUCCEEDED", task
    assert (task["rowsImported"], task["rowsFailed"], task["errorReportUrl"]) == (50, 0, None)
    assert task["progress"]["percent"] == 100.0 and task["progress"]["bytes"] == len(content)
    assert task["progress"]["processedRows"] == 50
    assert task["upload"] is None  # the upload target is only offered while the file is awaited
    assert Target(test_data, source).ids(ids) == ids
    statuses = [e["status"] for e in task["events"]]
    assert statuses == ["WAITING_FOR_UPLOAD", "PENDING", "PROCESSING", "SUCCEEDED"], task["events"]


def test_upload_targets_per_backend(local_stack: Stack, s3_stack: Stack):
    local = local_stack.api().request_import(dataset="imp_sqlite", fileName="a.csv")["task"]["upload"]
    assert local["method"] == "PUT" and local["url"].startswith(f"{local_stack.url}/uploads/")
    assert local["headers"]["Content-Type"].startswith("text/csv")
    s3 = s3_stack.api().request_import(dataset="imp_sqlite", fileName="../../a b.csv", format="NDJSON")
    target = s3["task"]["upload"]
    assert target["method"] == "POST"
    assert target["fields"]["key"].endswith(f"/{s3['task']['id']}/a b.csv")  # the name's last segment only
    assert "policy" in {k.lower() for k in target["fields"]}


# -- requests that are refused ----------------------------------------------------------------------------


def test_request_import_refusals_name_the_field(local_stack: Stack):
    api = local_stack.api()
    cases = [
        ({"dataset": "nope", "fileName": "a.csv"}, "DATASET_NOT_FOUND", ["input", "dataset"]),
        ({"dataset": "special", "fileName": "a.csv"}, "NOT_IMPORTABLE", ["input", "dataset"]),
        ({"dataset": "imp_sqlite", "fileName": "  "}, "INVALID_FILE_NAME", ["input", "fileName"]),
        (
            {"dataset": "imp_sqlite", "fileName": "a.csv", "fileSize": MAX_UPLOAD_BYTES + 1},
            "FILE_TOO_LARGE",
            ["input", "fileSize"],
        ),
        ({"dataset": "imp_sqlite", "fileName": "a.csv", "maxErrors": 0}, "INVALID_MAX_ERRORS", ["input", "maxErrors"]),
    ]
    for request, code, field in cases:
        payload = api.request_import(**request)
        assert payload["task"] is None, request
        assert [(e["code"], e["field"]) for e in payload["userErrors"]] == [(code, field)], payload
        assert payload["userErrors"][0]["message"]


def test_start_without_upload_is_refused_and_other_owners_see_nothing(local_stack: Stack):
    api = local_stack.api()
    task = api.request_import(dataset="imp_sqlite", fileName="a.csv")["task"]
    started = api.import_mutation("startImport", task["id"])
    assert [e["code"] for e in started["userErrors"]] == ["UPLOAD_MISSING"]
    other = local_stack.api()
    assert other.import_task(task["id"]) is None
    assert [e["code"] for e in other.import_mutation("startImport", task["id"])["userErrors"]] == ["NOT_FOUND"]
    assert api.import_task(task["id"])["status"] == "WAITING_FOR_UPLOAD"


def test_local_upload_link_is_signed_and_capped(local_stack: Stack):
    api = local_stack.api()
    task = api.request_import(dataset="imp_sqlite", fileName="a.csv")["task"]
    url = task["upload"]["url"]
    tampered = url.replace("signature=", "signature=0")
    assert httpx.put(tampered, content=b"id\n1\n").status_code == 403
    too_big = httpx.put(url, content=_chunks(MAX_UPLOAD_BYTES + 1))  # streamed: no Content-Length to trust
    assert too_big.status_code == 413, too_big.text
    assert [e["code"] for e in api.import_mutation("startImport", task["id"])["userErrors"]] == ["UPLOAD_MISSING"]


def _chunks(total: int, size: int = 1 << 20):
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        yield b"x" * piece
        sent += piece


# -- starting, exactly once -------------------------------------------------------------------------------


def test_start_twice_and_a_storage_event_run_the_import_once(s3_stack: Stack, test_data: TestData):
    api = s3_stack.api()
    ids = fresh_ids(5)
    content = csv_bytes(good_rows(ids))
    task = api.request_import(dataset="imp_sqlite", fileName="once.csv")["task"]
    assert api.upload(task["upload"], content, "once.csv").status_code in (200, 204)
    key = task["upload"]["fields"]["key"]
    event = {
        "EventName": "s3:ObjectCreated:Post",
        "Key": f"dataport/{key}",
        "Records": [
            {
                "eventVersion": "2.0",
                "eventSource": "minio:s3",
                "eventName": "s3:ObjectCreated:Post",
                "s3": {
                    "bucket": {"name": s3_stack.env["DATAPORT_S3_BUCKET"]},
                    "object": {"key": key.replace(" ", "+"), "size": len(content)},
                },
            }
        ],
    }
    headers = {"Authorization": f"Bearer {EVENTS_SECRET}"}
    assert httpx.post(f"{s3_stack.url}/storage-events", json=event).status_code == 401
    first = httpx.post(f"{s3_stack.url}/storage-events", json=event, headers=headers)
    assert first.status_code == 200 and first.json()["imports"] == [task["id"]], first.text
    again = httpx.post(f"{s3_stack.url}/storage-events", json=event, headers={"Authorization": EVENTS_SECRET})
    assert again.status_code == 200
    assert api.import_mutation("startImport", task["id"])["userErrors"] == []
    done = api.wait_import(task["id"])
    assert done["status"] == "SUCCEEDED" and done["attempts"] == 1 and done["rowsImported"] == 5
    assert [e["status"] for e in done["events"]].count("PENDING") == 1
    assert Target(test_data, "sqlite").ids(ids) == ids


def test_storage_events_refuse_what_is_not_an_event(local_stack: Stack):
    headers = {"Authorization": f"Bearer {EVENTS_SECRET}"}
    bad = httpx.post(f"{local_stack.url}/storage-events", content=b"{nope", headers=headers)
    assert bad.status_code == 400 and "JSON" in bad.json()["detail"]
    wrong = httpx.post(f"{local_stack.url}/storage-events", json={"hello": 1}, headers=headers)
    assert wrong.status_code == 400 and "Records" in wrong.json()["detail"]
    other = httpx.post(
        f"{local_stack.url}/storage-events",
        headers=headers,
        json={"Records": [{"eventName": "ObjectCreated:Put", "s3": {"object": {"key": "exports/x/y/z.csv"}}}]},
    )
    assert other.status_code == 200 and other.json()["imports"] == []


# -- rows that fail, the report, maxErrors, dry runs ------------------------------------------------------


def test_failed_rows_go_to_the_error_report_and_valid_rows_are_written(local_stack: Stack, test_data: TestData):
    api = local_stack.api()
    ids = fresh_ids(6)
    rows = good_rows(ids)
    rows[1][2] = "1.2.3"  # score: not a float
    rows[2][4] = "maybe"  # active: not a boolean
    rows[3][1] = "x" * 41  # name: longer than max_length 40
    rows[4][0] = ""  # id: required
    rows[5][5] = "2023-02-30"  # born: not a date
    task = api.run_import("imp_sqlite", csv_bytes(rows))
    assert task["status"] == "SUCCEEDED", task
    assert (task["rowsImported"], task["rowsFailed"]) == (1, 5)
    assert Target(test_data, "sqlite").ids(ids) == [ids[0]]
    report = api.download(task["errorReportUrl"])
    assert report.status_code == 200
    lines = list(csv.reader(io.StringIO(report.text)))
    assert lines[0] == ["row", "column", "reason", "original"]
    by_row = {int(line[0]): line for line in lines[1:]}
    assert sorted(by_row) == [2, 3, 4, 5, 6]
    assert by_row[2][1] == "score" and "1.2.3" in by_row[2][2]
    assert by_row[3][1] == "active" and by_row[4][1] == "name" and "40" in by_row[4][2]
    assert by_row[5][1] == "id" and by_row[6][1] == "born"
    assert next(csv.reader([by_row[2][3]]))[:2] == [str(ids[1]), f"row {ids[1]}"]  # the original row


def test_reaching_max_errors_fails_and_writes_nothing(local_stack: Stack, test_data: TestData):
    api = local_stack.api()
    ids = fresh_ids(20)
    rows = good_rows(ids)
    for row in rows[5:]:
        row[3] = "many"
    task = api.run_import("imp_postgres", csv_bytes(rows), maxErrors=3)
    assert task["status"] == "FAILED"
    assert task["error"]["code"] == "TOO_MANY_ERRORS" and "nothing was written" in task["error"]["message"]
    assert task["rowsFailed"] == 3 and task["errorReportUrl"]
    assert len(list(csv.reader(io.StringIO(api.download(task["errorReportUrl"]).text)))) == 4
    assert Target(test_data, "postgres").ids(ids) == []


def test_dry_run_validates_and_writes_nothing(local_stack: Stack, test_data: TestData):
    api = local_stack.api()
    ids = fresh_ids(10)
    rows = good_rows(ids)
    rows[0][2] = "oops"
    task = api.run_import("imp_postgres", csv_bytes(rows), dryRun=True)
    assert task["status"] == "SUCCEEDED" and task["dryRun"] is True
    assert (task["rowsImported"], task["rowsFailed"]) == (9, 1)
    assert "nothing was written" in task["events"][-1]["message"]
    assert Target(test_data, "postgres").ids(ids) == []


# -- modes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
def test_upsert_updates_and_insert_refuses_existing_keys(local_stack: Stack, test_data: TestData, source: str):
    api = local_stack.api()
    ids = fresh_ids(4)
    target = Target(test_data, source)
    assert api.run_import(f"imp_{source}", csv_bytes(good_rows(ids[:2])))["status"] == "SUCCEEDED"

    changed = good_rows(ids)
    changed[0][1] = "renamed"
    upsert = api.run_import(f"imp_{source}", csv_bytes(changed), mode="UPSERT")
    assert upsert["status"] == "SUCCEEDED" and upsert["rowsImported"] == 4
    assert target.names(ids) == {
        ids[0]: "renamed",
        ids[1]: f"row {ids[1]}",
        ids[2]: f"row {ids[2]}",
        ids[3]: f"row {ids[3]}",
    }

    again = good_rows([ids[0], fresh_ids(1)[0]])
    insert = api.run_import(f"imp_{source}", csv_bytes(again))
    assert insert["status"] == "FAILED", insert
    assert insert["error"]["code"] == "WRITE_FAILED" and str(ids[0]) in insert["error"]["message"]
    if source != "opensearch":  # no transactions there; DESIGN and the README say so
        assert target.ids([again[1][0]]) == []
    assert target.names([ids[0]]) == {ids[0]: "renamed"}


# -- the bad-file corpus ----------------------------------------------------------------------------------

BAD_FILES: list[tuple[str, str, bytes, str]] = [
    ("latin-1", "CSV", "id,name\n1,caf\xe9\n".encode("latin-1"), "UTF-8"),
    ("unclosed quote", "CSV", b'id,name\n1,"never closed\n2,x\n', "quote"),
    ("empty", "CSV", b"", "empty"),
    ("duplicate header", "CSV", b"id,name,name\n1,a,b\n", "name"),
    ("unknown column", "CSV", b"id,colour\n1,red\n", "colour"),
    ("missing required column", "CSV", b"name\nx\n", "id"),
    ("JSON object, not array", "JSON", b'{"id": 1}', "array"),
    ("truncated JSON", "JSON", b'[{"id": 1}, {"id": 2', "end"),
    ("not an XLSX", "XLSX", b"PK\x03\x04 but not a zip at all", "XLSX"),
]


@pytest.mark.parametrize(("label", "file_format", "content", "says"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_fail_clearly_and_write_nothing(local_stack: Stack, label, file_format, content, says):
    api = local_stack.api()
    task = api.run_import("imp_sqlite", content, file_format=file_format, file_name=f"bad.{file_format.lower()}")
    assert task["status"] == "FAILED", (label, task)
    assert task["error"]["code"] in ("INVALID_FILE", "INVALID_HEADER"), task["error"]
    assert says.lower() in task["error"]["message"].lower(), task["error"]["message"]
    assert "Traceback" not in task["error"]["message"]
    assert task["rowsImported"] == 0


def test_rows_of_a_bad_file_that_can_be_told_apart_fail_alone(local_stack: Stack, test_data: TestData):
    """Ragged rows and a 10 MB cell fail their rows; a BOM and mixed line endings are fine."""
    api = local_stack.api()
    ids = fresh_ids(5)
    lines = [",".join(HEADER)]
    lines += [",".join(str(c) for c in row) for row in good_rows(ids)]
    lines[2] += ",extra"  # a ragged row: one cell too many
    lines[3] = f'{ids[2]},"{"x" * (10 * 1024 * 1024)}"'  # a 10 MB cell (and too few cells)
    content = b"\xef\xbb\xbf" + "\r\n".join(lines[:3]).encode() + b"\n" + "\n".join(lines[3:]).encode() + b"\r\n"
    task = api.run_import("imp_sqlite", content)
    assert task["status"] == "SUCCEEDED", task
    assert (task["rowsImported"], task["rowsFailed"]) == (3, 2)
    assert Target(test_data, "sqlite").ids(ids) == [ids[0], ids[3], ids[4]]
    report = api.download(task["errorReportUrl"]).text
    assert len(report) < 1024 * 1024  # the huge cell is not copied into the report whole


def test_a_header_alone_imports_nothing_and_succeeds(local_stack: Stack):
    task = local_stack.api().run_import("imp_sqlite", ",".join(HEADER).encode() + b"\r\n")
    assert task["status"] == "SUCCEEDED" and task["rowsImported"] == 0 and task["rowsFailed"] == 0


def test_xlsx_formulas_fail_their_rows(local_stack: Stack, tmp_path):
    import openpyxl

    ids = fresh_ids(2)
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["id", "name", "score"])
    sheet.append([ids[0], "plain", 1.5])
    sheet.append([ids[1], "formula", "=1+2"])
    path = tmp_path / "f.xlsx"
    book.save(path)
    task = local_stack.api().run_import("imp_sqlite", path.read_bytes(), file_format="XLSX", file_name="f.xlsx")
    assert task["status"] == "SUCCEEDED", task
    assert (task["rowsImported"], task["rowsFailed"]) == (1, 1)


# -- cancel, kill, retry ----------------------------------------------------------------------------------


def big_csv(ids_from: int, rows: int) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(HEADER)
    for i in range(ids_from, ids_from + rows):
        writer.writerow([i, f"row {i}", i / 4, i % 7, "true", "2024-02-29", "2024-02-29T12:30:00Z", "n" * 40])
    return out.getvalue().encode()


def test_cancel_while_waiting_pending_and_processing(idle_queue: Stack, test_data: TestData):
    api = idle_queue.api()
    waiting = api.request_import(dataset="imp_postgres", fileName="a.csv")["task"]
    assert api.import_mutation("cancelImport", waiting["id"])["task"]["status"] == "CANCELLED"

    pending = api.start_import("imp_postgres", csv_bytes(good_rows(fresh_ids(3))))
    assert api.import_mutation("cancelImport", pending["id"])["task"]["status"] == "CANCELLED"

    start = 50_000_000
    running = api.start_import("imp_postgres", big_csv(start, 300_000))
    idle_queue.start_worker()
    task = api.wait_import(running["id"], "PROCESSING", timeout=60)
    while task["progress"]["processedRows"] == 0:
        task = api.import_task(running["id"])
    cancelled_at = time.monotonic()
    assert api.import_mutation("cancelImport", running["id"])["task"]["status"] == "CANCELLED"
    time.sleep(2)
    assert Target(test_data, "postgres").ids([start, start + 1, start + 299_999]) == []
    assert api.import_task(running["id"])["status"] == "CANCELLED"
    assert api.import_task(pending["id"])["status"] == "CANCELLED"  # it never started
    assert time.monotonic() - cancelled_at < 30


@pytest.mark.parametrize("source", ["sqlite", "postgres"])
def test_a_worker_killed_mid_import_leaves_the_table_as_it_was(idle_queue: Stack, test_data: TestData, source):
    api = idle_queue.api()
    start = 60_000_000 if source == "sqlite" else 70_000_000
    rows = 300_000
    task = api.start_import(f"imp_{source}", big_csv(start, rows))
    worker = idle_queue.start_worker()
    seen = api.wait_import(task["id"], "PROCESSING", timeout=60)
    while seen["progress"]["processedRows"] < 20_000:
        seen = api.import_task(task["id"])
        assert seen["status"] == "PROCESSING", seen
    idle_queue.kill(worker)
    target = Target(test_data, source)
    assert target.ids([start, start + 10_000]) == []  # the killed attempt's rows are not there
    idle_queue.start_worker()
    done = api.wait_import(task["id"], timeout=150)
    assert done["status"] == "SUCCEEDED" and done["attempts"] == 2, done
    assert done["rowsImported"] == rows
    assert target.ids([start, start + rows // 2, start + rows - 1]) == [start, start + rows // 2, start + rows - 1]


# -- progress over the subscription ------------------------------------------------------------------------


def test_import_progress_subscription_follows_to_the_end(local_stack: Stack):
    api = local_stack.api()
    task = api.start_import("imp_sqlite", big_csv(80_000_000, 100_000))
    messages = asyncio.run(api.subscribe(task["id"], field="importProgress"))
    snapshots = [m["payload"]["data"]["importProgress"] for m in messages if m["type"] == "next"]
    assert messages[-1]["type"] == "complete"
    assert snapshots[-1]["status"] == "SUCCEEDED" and snapshots[-1]["rowsImported"] == 100_000
    percents = [s["progress"]["percent"] for s in snapshots if s["progress"]["percent"] is not None]
    assert percents == sorted(percents) and percents[-1] == 100.0


# -- the round trip ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_format", ["CSV", "NDJSON"])
@pytest.mark.parametrize("source", SOURCES)
def test_round_trip_export_import_export_is_byte_identical(local_stack: Stack, source: str, file_format: str):
    api = local_stack.api()
    origin = {"sqlite": "special", "postgres": "special_pg", "opensearch": "special_os"}[source]
    copy = f"rt_{file_format.lower()}_{source}"
    _, first = api.run_export(dataset=origin, format=file_format, sort=[{"field": "id"}])
    task = api.run_import(copy, first, file_format=file_format, file_name=f"special.{file_format.lower()}")
    assert task["status"] == "SUCCEEDED" and task["rowsFailed"] == 0, task
    _, second = api.run_export(dataset=copy, format=file_format, sort=[{"field": "id"}])
    assert second == first
    if file_format == "NDJSON":
        assert [orjson.loads(line)["id"] for line in second.splitlines()] == [1, 2, 3, 4, 5, 6, 7]


# -- an upload that never comes ---------------------------------------------------------------------------


async def test_an_import_whose_upload_never_came_expires_with_its_partial_file(local_stack: Stack):
    from tasks.services import Services
    from tasks.store import EXPIRY_KEY
    from workers.cron import expire_tasks

    api = local_stack.api()
    waiting = (await asyncio.to_thread(api.request_import, dataset="imp_sqlite", fileName="late.csv"))["task"]
    started = await asyncio.to_thread(api.start_import, "imp_sqlite", csv_bytes(good_rows(fresh_ids(1))))
    services = await Services.start(local_stack.settings)
    try:
        scheduled = await services.redis.zscore(EXPIRY_KEY, waiting["id"])
        window = dt.datetime.fromisoformat(waiting["upload"]["expiresAt"]).timestamp()
        assert scheduled == pytest.approx(window + 600, abs=2)  # the upload window, then some grace
        # started: not on the upload window (once it has finished, on the retention of finished tasks: days)
        other = await services.redis.zscore(EXPIRY_KEY, started["id"])
        assert other is None or other > scheduled + 86_400
        task = await services.store.get(waiting["id"])
        await asyncio.to_thread(
            httpx.put, waiting["upload"]["url"], content=b"id\n1\n", headers=waiting["upload"]["headers"]
        )
        assert await services.storage.size_of(task.object_key) == 5
        await services.redis.zadd(EXPIRY_KEY, {waiting["id"]: 0})  # as if the window had closed
        assert await expire_tasks({"services": services}) >= 1
        assert await services.storage.size_of(task.object_key) is None  # the uploaded bytes went too
    finally:
        await services.close()
    expired = await asyncio.to_thread(api.import_task, waiting["id"])
    assert expired["status"] == "EXPIRED" and expired["upload"] is None
    assert expired["events"][-1]["message"] == "no file was uploaded in time"
    refused = await asyncio.to_thread(api.import_mutation, "startImport", waiting["id"])
    assert [e["code"] for e in refused["userErrors"]] == ["INVALID_STATUS"]


# -- retries, the other formats, the report on S3 ------------------------------------------------------------


def test_a_locked_table_is_retried_and_the_import_completes(local_stack: Stack, test_data: TestData):
    """A real transient failure: another connection holds SQLite's write lock past the busy timeout."""
    api = local_stack.api()
    ids = fresh_ids(3)
    locker = sqlite3.connect(test_data.imports_db, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # the write lock, held by someone else
    try:
        task = api.start_import("imp_sqlite", csv_bytes(good_rows(ids)))
        deadline = time.monotonic() + 30
        while not any("retrying" in (e["message"] or "") for e in api.import_task(task["id"])["events"]):
            assert time.monotonic() < deadline, api.import_task(task["id"])
            time.sleep(0.05)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    done = api.wait_import(task["id"])
    assert done["status"] == "SUCCEEDED" and done["attempts"] >= 2, done
    assert Target(test_data, "sqlite").ids(ids) == ids


@pytest.mark.parametrize("file_format", ["XLSX", "JSON"])
def test_an_export_in_xlsx_or_json_imports_cleanly(local_stack: Stack, file_format: str):
    api = local_stack.api()
    _, content = api.run_export(dataset="special", format=file_format, sort=[{"field": "id"}])
    task = api.run_import(
        "imp_sqlite", content, file_format=file_format, file_name=f"s.{file_format.lower()}", dryRun=True
    )
    assert task["status"] == "SUCCEEDED", task
    assert (task["rowsImported"], task["rowsFailed"]) == (7, 0)


def test_the_error_report_on_s3_is_an_api_link_to_a_presigned_url(s3_stack: Stack, test_data: TestData):
    api = s3_stack.api()
    ids = fresh_ids(2)
    rows = good_rows(ids)
    rows[1][0] = "=2+2"  # id: not an integer; and the original row, as text, starts like a formula
    task = api.run_import("imp_postgres", csv_bytes(rows))
    assert task["status"] == "SUCCEEDED" and (task["rowsImported"], task["rowsFailed"]) == (1, 1)
    assert task["errorReportUrl"].startswith(f"{s3_stack.url}/files/{task['id']}?")  # api/downloads.py
    assert "X-Amz-Signature" in httpx.get(task["errorReportUrl"]).headers["location"]
    report = list(csv.reader(io.StringIO(api.download(task["errorReportUrl"]).text)))
    assert report[1][:2] == ["2", "id"]
    assert report[1][3].startswith(f"'=2+2,row {ids[1]},")  # guarded: a spreadsheet shows it as text
    assert Target(test_data, "postgres").ids(ids) == [ids[0]]


def test_start_refuses_an_object_over_the_limit_that_s3_let_through(s3_stack: Stack, s3_server):
    """A presigned PUT cannot cap the size on S3: startImport checks the object before queueing."""
    api = s3_stack.api()
    task = api.request_import(dataset="imp_sqlite", fileName="huge.csv")["task"]
    key = task["upload"]["fields"]["key"]
    s3_server.client().put_object(
        Bucket=s3_stack.env["DATAPORT_S3_BUCKET"],
        Key=key,
        Body=b"x" * (MAX_UPLOAD_BYTES + 1),
        ServerSideEncryption="AES256",
    )
    started = api.import_mutation("startImport", task["id"])
    assert [(e["code"], e["field"]) for e in started["userErrors"]] == [("FILE_TOO_LARGE", ["id"])]
    assert f"{MAX_UPLOAD_BYTES:,} bytes" in started["userErrors"][0]["message"]
    assert api.import_task(task["id"])["status"] == "WAITING_FOR_UPLOAD"  # nothing was queued
