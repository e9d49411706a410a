"""Exports end to end: real api and worker processes, real Redis, local storage and SeaweedFS S3."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import re
import time

import httpx
import pytest
import websockets

from tests.client import Api
from tests.fixtures.s3 import client_for
from tests.fixtures.stack import DEMO_ROWS, SPECIAL_COLUMNS, SPECIAL_ROWS, first_attempt_fails_on_a_lock

NAMES = [c.name for c in SPECIAL_COLUMNS]
GUARD = ("=", "+", "-", "@", "\t", "\r")


def _expected_cells(row: tuple) -> list[str]:
    """How the CSV writer renders a source row: typed, null as empty, formula guard on text."""
    cells = []
    for column, value in zip(SPECIAL_COLUMNS, row, strict=True):
        if value is None:
            cells.append("")
        elif column.type == "boolean":
            cells.append("true" if value else "false")
        elif column.type == "float":
            cells.append(repr(float(value)))
        elif column.type == "string" and value[:1] in GUARD and value:
            cells.append("'" + value)
        else:
            cells.append(str(value))
    return cells


def _typed(row: tuple) -> dict:
    out = {}
    for column, value in zip(SPECIAL_COLUMNS, row, strict=True):
        if value is not None and column.type == "boolean":
            value = bool(value)
        if value is not None and column.type == "float":
            value = float(value)
        out[column.name] = value
    return out


# -- the whole flow ------------------------------------------------------------------------------


def test_export_over_http_from_request_to_download(local_stack):
    api = local_stack.api()
    task = api.export(dataset="special", format="CSV")
    assert task["status"] in ("PENDING", "PROCESSING") and task["run"] == 1
    assert task["pollAfterSeconds"] == pytest.approx(5.0)
    done = api.wait(task["id"])
    assert done["status"] == "SUCCEEDED", done
    assert done["rowCount"] == len(SPECIAL_ROWS) and done["progress"]["processedRows"] == len(SPECIAL_ROWS)
    assert done["progress"]["percent"] == 100.0 and done["attempts"] == 1
    assert [e["status"] for e in done["events"]] == ["PENDING", "PROCESSING", "SUCCEEDED"]
    assert all(e["at"] and e["message"] for e in done["events"])
    assert done["startedAt"] and done["finishedAt"] and done["expiresAt"]
    body = api.download(done["downloadUrl"])
    assert body.status_code == 200
    assert body.headers["content-disposition"].startswith("attachment")
    assert len(body.content) == done["fileSize"]
    assert hashlib.sha256(body.content).hexdigest() == done["checksumSha256"]
    time.sleep(1.1)  # expiry has one-second resolution
    assert api.task(task["id"])["downloadUrl"] != done["downloadUrl"], "download URLs are issued afresh"


@pytest.mark.parametrize("fmt", ["CSV", "JSON", "NDJSON", "XLSX"])
def test_file_contents_equal_the_source_rows(local_stack, fmt):
    _, content = local_stack.api().run_export(dataset="special", format=fmt)
    if fmt == "XLSX":
        import openpyxl
        from openpyxl.utils.escape import unescape

        sheet = openpyxl.load_workbook(io.BytesIO(content), read_only=True).active
        rows = [list(r) for r in sheet.iter_rows(values_only=True)]
        assert rows[0] == NAMES
        for got, source in zip(rows[1:], SPECIAL_ROWS, strict=True):
            want = _typed(source)
            for column in SPECIAL_COLUMNS:
                cell, value = got[NAMES.index(column.name)], want[column.name]
                if isinstance(cell, str):
                    cell = unescape(cell)  # XLSX stores a carriage return as _x000D_
                if column.type == "string" and value and value[0] in GUARD:
                    value = "'" + value  # the formula guard applies to spreadsheets too
                if value == "":
                    value = None  # an empty text cell is an empty cell
                assert cell == pytest.approx(value) if isinstance(value, float) else cell == value, column.name
    elif fmt == "CSV":
        parsed = list(csv.reader(io.StringIO(content.decode("utf-8"), newline="")))
        assert parsed[0] == NAMES
        assert parsed[1:] == [_expected_cells(r) for r in SPECIAL_ROWS]
    elif fmt == "JSON":
        assert json.loads(content) == [_typed(r) for r in SPECIAL_ROWS]
    else:
        lines = content.decode().splitlines()
        assert [json.loads(line) for line in lines] == [_typed(r) for r in SPECIAL_ROWS]


def test_columns_filters_sort_and_limit_shape_the_file(local_stack):
    _, content = local_stack.api().run_export(
        dataset="special",
        format="NDJSON",
        columns=["id", "score"],
        filters=[{"field": "score", "op": "GT", "value": 0}],
        sort=[{"field": "score", "direction": "DESC"}],
        limit=3,
    )
    rows = [json.loads(line) for line in content.decode().splitlines()]
    assert rows == [{"id": 6, "score": 12345.678}, {"id": 7, "score": 3.0}, {"id": 1, "score": 1.5}]


async def test_subscription_snapshot_first_progress_monotonic_then_complete(local_stack):
    api = local_stack.api()
    task = api.export(dataset="samples", format="CSV")
    messages = await api.subscribe(task["id"])
    assert messages[-1]["type"] == "complete"
    snapshots = [m["payload"]["data"]["exportProgress"] for m in messages if m["type"] == "next"]
    assert snapshots[0]["status"] in ("PENDING", "PROCESSING", "SUCCEEDED")
    assert snapshots[-1]["status"] == "SUCCEEDED" and snapshots[-1]["rowCount"] == DEMO_ROWS
    rows = [s["progress"]["processedRows"] for s in snapshots]
    assert rows == sorted(rows), "progress went back"
    running = [s for s in snapshots if s["status"] == "PROCESSING" and s["progress"]["processedRows"]]
    assert running, "no progress was reported while processing"
    middle = running[len(running) // 2]["progress"]
    assert middle["totalRows"] == DEMO_ROWS and 0 < middle["percent"] <= 100
    assert middle["rowsPerSecond"] > 0 and middle["etaSeconds"] is not None and middle["bytes"] > 0


async def test_legacy_graphql_ws_protocol_is_served_too(local_stack):
    api = local_stack.api()
    task = api.export(dataset="special", format="JSON")
    messages = await api.subscribe(task["id"], protocol="graphql-ws")
    data = [m["payload"]["data"]["exportProgress"] for m in messages if m["type"] == "data"]
    assert data and data[-1]["status"] == "SUCCEEDED" and messages[-1]["type"] == "complete"


def test_progress_is_written_at_most_four_times_a_second(local_stack, redis_url):
    import redis

    api = local_stack.api()
    task = api.export(dataset="samples", format="JSON")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    pubsub = client.pubsub()
    pubsub.subscribe(f"dataport:channel:{task['id']}")
    stamps = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        if message:
            snapshot = json.loads(message["data"])
            if snapshot["status"] == "PROCESSING":
                stamps.append(time.monotonic())
            if snapshot["status"] in ("SUCCEEDED", "FAILED"):
                break
    pubsub.close()
    assert len(stamps) >= 3, "the export was too quick to observe progress"
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]  # after the claim itself
    assert min(gaps) >= 0.2, f"progress written {1 / min(gaps):.0f} times a second"


# -- reuse, retry, delete, history -------------------------------------------------------------


def test_the_same_request_gives_the_same_task(local_stack):
    api = local_stack.api()
    first = api.export(dataset="special", format="CSV", columns=["id", "name"])
    again = api.export(dataset="special", format="CSV", columns=["id", "name"])
    assert again["id"] == first["id"]
    done = api.wait(first["id"])
    after = api.export(dataset="special", format="CSV", columns=["id", "name"])
    assert after["id"] == first["id"] and after["status"] == "SUCCEEDED" and after["run"] == 1
    assert after["checksumSha256"] == done["checksumSha256"]
    other = api.export(dataset="special", format="CSV", columns=["name", "id"])
    assert other["id"] != first["id"]
    assert local_stack.api().export(dataset="special", format="CSV", columns=["id", "name"])["id"] != first["id"]


def test_polling_backs_off(local_stack):
    api = local_stack.api()
    task = api.export(dataset="samples", format="NDJSON", limit=60_000)
    hints = [api.task(task["id"])["pollAfterSeconds"] for _ in range(3)]
    api.mutate("cancelExport", task["id"])
    assert hints[0] > 5.0 and hints[1] == pytest.approx(hints[0] + 0.693, abs=0.01) and hints[2] > hints[1]


def test_history_lists_newest_first_and_filters_by_status(local_stack):
    api = local_stack.api()
    ids = [api.export(dataset="special", format=f)["id"] for f in ("CSV", "JSON", "NDJSON")]
    for i in ids:
        api.wait(i)
    query = """query($first: Int, $after: String, $status: TaskStatus) {
      exportTasks(first: $first, after: $after, status: $status) {
        totalCount pageInfo { hasNextPage endCursor } edges { cursor node { id status } } } }"""
    page = api.data(query, {"first": 2})["exportTasks"]
    assert page["totalCount"] == 3 and page["pageInfo"]["hasNextPage"]
    assert [e["node"]["id"] for e in page["edges"]] == [ids[2], ids[1]]
    rest = api.data(query, {"first": 2, "after": page["pageInfo"]["endCursor"]})["exportTasks"]
    assert [e["node"]["id"] for e in rest["edges"]] == [ids[0]] and not rest["pageInfo"]["hasNextPage"]
    failed = api.data(query, {"first": 10, "status": "FAILED"})["exportTasks"]
    assert failed["edges"] == [] and failed["totalCount"] == 0


def test_delete_removes_the_file_and_the_task(local_stack):
    api = local_stack.api()
    task, _ = api.run_export(dataset="special", format="CSV")
    url = task["downloadUrl"]
    deleted = api.mutate("deleteExport", task["id"])
    assert deleted["userErrors"] == [] and deleted["task"]["id"] == task["id"]
    assert api.task(task["id"]) is None
    assert httpx.get(url).status_code == 404
    files = list((local_stack.data_dir / "files").rglob(f"*{task['id']}*"))
    assert files == [] or all(not p.is_file() for p in files)


def test_a_source_error_mid_export_fails_with_an_actionable_message(local_stack):
    api = local_stack.api()
    task = api.export(dataset="broken", format="CSV")
    done = api.wait(task["id"])
    assert done["status"] == "FAILED" and done["attempts"] == 1, "a data error is not retried"
    assert done["error"]["code"] == "SOURCE_ERROR"
    assert "Row 3001" in done["error"]["message"] and "'value'" in done["error"]["message"]
    assert done["events"][-1]["status"] == "FAILED" and "Row 3001" in done["events"][-1]["message"]
    assert done["downloadUrl"] is None
    retried = api.mutate("retryExport", task["id"])
    assert retried["userErrors"] == [] and retried["task"]["run"] == 2


# -- errors before anything is queued ---------------------------------------------------------


@pytest.mark.parametrize(
    ("export_input", "code", "field"),
    [
        ({"dataset": "nope"}, "DATASET_NOT_FOUND", ["input", "dataset"]),
        ({"dataset": "special", "columns": ["id", "nope"]}, "UNKNOWN_COLUMN", ["input", "columns", "1"]),
        ({"dataset": "special", "limit": 0}, "INVALID_LIMIT", ["input", "limit"]),
        (
            {"dataset": "special", "filters": [{"field": "notes", "op": "EQ", "value": "x"}]},
            "NOT_FILTERABLE",
            ["input", "filters", "0", "field"],
        ),
        (
            {"dataset": "special", "filters": [{"field": "score", "op": "BETWEEN", "values": [1]}]},
            "INVALID_FILTER_VALUE",
            ["input", "filters", "0", "values"],
        ),
        ({"dataset": "small_limit"}, "TOO_MANY_ROWS", ["input", "filters"]),
    ],
)
def test_bad_requests_are_user_errors_and_queue_nothing(local_stack, export_input, code, field):
    api = local_stack.api()
    payload = api.request_export(**export_input)
    assert payload["task"] is None
    assert [(e["code"], e["field"]) for e in payload["userErrors"]] == [(code, field)]
    assert payload["userErrors"][0]["message"]
    listed = api.data("{ exportTasks { totalCount } }")["exportTasks"]
    assert listed["totalCount"] == 0


def test_a_limit_brings_a_large_export_under_the_maximum(local_stack):
    api = local_stack.api()
    assert api.request_export(dataset="small_limit")["userErrors"][0]["code"] == "TOO_MANY_ROWS"
    task, content = api.run_export(dataset="small_limit", format="NDJSON", limit=5)
    assert task["rowCount"] == 5 and len(content.splitlines()) == 5


# -- auth and owner isolation -----------------------------------------------------------------


def test_missing_or_bad_tokens_are_unauthenticated(local_stack):
    for token in (None, "not-a-jwt", local_stack.token("x") + "tampered"):
        body = Api(local_stack.url, token).gql("{ datasets { name } }")
        assert body["data"] is None or body["data"].get("datasets") is None
        assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


async def test_websocket_without_a_token_is_unauthenticated(local_stack):
    """DESIGN.md (December): connection_init without a valid token gets no ack; the socket is closed
    with 4401 (tests/test_hostile_api.py tries every kind of bad token, on both protocols)."""
    url = local_stack.url.replace("http", "ws", 1) + "/graphql"
    async with asyncio.timeout(10), websockets.connect(url, subprotocols=["graphql-transport-ws"]) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": {}}))
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 4401


async def test_another_owners_task_looks_exactly_like_a_missing_one(local_stack):
    alice, mallory = local_stack.api("alice-iso"), local_stack.api("mallory-iso")
    task, _ = alice.run_export(dataset="special", format="CSV", columns=["id"])
    tid, missing = task["id"], "a" * 24

    assert mallory.task(tid) is None and mallory.task(missing) is None
    listed = mallory.data("{ exportTasks { totalCount edges { node { id } } } }")["exportTasks"]
    assert tid not in [e["node"]["id"] for e in listed["edges"]]
    for mutation in ("cancelExport", "retryExport", "deleteExport"):
        theirs, nobodys = mallory.mutate(mutation, tid), mallory.mutate(mutation, missing)
        assert theirs["task"] is None
        assert theirs["userErrors"][0]["code"] == nobodys["userErrors"][0]["code"] == "NOT_FOUND"
        assert theirs["userErrors"][0]["message"].replace(tid, "?") == nobodys["userErrors"][0]["message"].replace(
            missing, "?"
        )
    theirs, nobodys = await mallory.subscribe(tid), await mallory.subscribe(missing)
    assert theirs[0]["type"] == nobodys[0]["type"]
    assert json.dumps(theirs[0]["payload"]).replace(tid, "?") == json.dumps(nobodys[0]["payload"]).replace(missing, "?")
    for identifier in (tid, missing):  # without alice's signed URL the file route says the same for both
        response = await asyncio.to_thread(
            httpx.get, f"{local_stack.url}/files/{identifier}?expires=9999999999&signature=x", headers=mallory.headers
        )
        assert response.status_code == 403
    assert alice.task(tid)["status"] == "SUCCEEDED", "mallory changed nothing"


def test_tampered_and_expired_download_links_are_refused(local_stack):
    from storage.signing import sign

    api = local_stack.api()
    task, _ = api.run_export(dataset="special", format="CSV", columns=["id"])
    url = httpx.URL(task["downloadUrl"])
    expires, signature = int(url.params["expires"]), url.params["signature"]
    base = f"{local_stack.url}/files/{task['id']}"
    assert httpx.get(f"{base}?expires={expires}&signature={signature}").status_code == 200
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    assert httpx.get(f"{base}?expires={expires}&signature={flipped}").status_code == 403
    assert httpx.get(f"{base}?expires={expires + 60}&signature={signature}").status_code == 403
    past = int(time.time()) - 1
    old = sign(local_stack.settings.signing_secret, "GET", task["id"], past)
    assert httpx.get(f"{base}?expires={past}&signature={old}").status_code == 403
    assert expires - time.time() == pytest.approx(15 * 60, abs=30)


# -- S3 -------------------------------------------------------------------------------------------


def test_s3_export_is_encrypted_verified_and_downloadable(s3_stack, s3_server):
    api = s3_stack.api()
    task, content = api.run_export(dataset="samples", format="CSV", limit=20_000)
    assert hashlib.sha256(content).hexdigest() == task["checksumSha256"] and len(content) == task["fileSize"]
    assert task["rowCount"] == 20_000 and content.count(b"\r\n") >= 20_001
    settings = s3_stack.settings
    s3 = client_for(settings)
    objects = s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix="exports/")["Contents"]
    key = next(o["Key"] for o in objects if task["id"] in o["Key"])
    assert re.search(rf"/{task['id']}/1/samples-\d{{8}}T\d{{6}}Z\.csv$", key), key  # run 1, tasks/file_names.py
    head = s3.head_object(Bucket=settings.s3_bucket, Key=key)
    assert head["ServerSideEncryption"] == "AES256" and head["ContentLength"] == task["fileSize"]
    url = httpx.URL(task["downloadUrl"])  # the api's link, which redirects to a fresh presigned URL
    presigned = httpx.get(url).headers["location"]
    assert "attachment" in httpx.get(presigned).headers.get("content-disposition", "")
    assert httpx.get(presigned.replace("X-Amz-Signature=", "X-Amz-Signature=0")).status_code == 403
    assert httpx.get(str(url).replace("signature=", "signature=0")).status_code == 403


def test_s3_and_local_files_are_identical(s3_stack, local_stack):
    request = {"dataset": "special", "format": "CSV"}
    _, from_s3 = s3_stack.api().run_export(**request)
    _, from_disk = local_stack.api().run_export(**request)
    assert from_s3 == from_disk


# -- the queue: pending, cancel, retries, dead workers ------------------------------------------


def _no_partials(stack, task_id: str) -> bool:
    return not [p for p in (stack.data_dir / "files").rglob("*") if task_id in str(p) and ".partial" in p.name]


def test_cancel_while_pending_means_it_never_starts(idle_queue):
    api = idle_queue.api()
    first = api.export(dataset="special", format="CSV")
    second = api.export(dataset="special", format="JSON")
    assert api.task(first["id"])["queuePosition"] == 1 and api.task(second["id"])["queuePosition"] == 2
    cancelled = api.mutate("cancelExport", first["id"])
    assert cancelled["task"]["status"] == "CANCELLED" and cancelled["task"]["queuePosition"] is None
    assert api.mutate("cancelExport", first["id"])["userErrors"][0]["code"] == "INVALID_STATUS"
    idle_queue.start_worker()
    assert api.wait(second["id"])["status"] == "SUCCEEDED"
    time.sleep(0.5)
    task = api.task(first["id"])
    assert task["status"] == "CANCELLED" and task["startedAt"] is None
    assert [e["status"] for e in task["events"]] == ["PENDING", "CANCELLED"]


def test_cancel_while_processing_stops_within_two_seconds(idle_queue):
    idle_queue.start_worker()
    api = idle_queue.api()
    task = api.export(dataset="samples", format="JSON")
    deadline = time.monotonic() + 60
    while (t := api.task(task["id"]))["progress"]["processedRows"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert t["status"] == "PROCESSING"
    cancelled = api.mutate("cancelExport", task["id"])
    stopped_at = time.monotonic()
    assert cancelled["task"]["status"] == "CANCELLED"
    while not _no_partials(idle_queue, task["id"]):
        assert time.monotonic() - stopped_at < 2.0, "partial file still there after 2 s"
        time.sleep(0.05)
    time.sleep(1.0)
    final = api.task(task["id"])
    assert final["status"] == "CANCELLED" and final["downloadUrl"] is None
    rows = final["progress"]["processedRows"]
    time.sleep(0.5)
    assert api.task(task["id"])["progress"]["processedRows"] == rows, "the worker kept writing progress"
    assert not list((idle_queue.data_dir / "files").rglob(f"*{task['id']}*/*.json"))


def test_a_worker_runs_three_jobs_at_once_and_queues_the_rest_in_order(idle_queue):
    api = idle_queue.api()
    tasks = [api.export(dataset="samples", format="NDJSON", limit=50_000 + i) for i in range(5)]
    assert [api.task(t["id"])["queuePosition"] for t in tasks] == [1, 2, 3, 4, 5]
    idle_queue.start_worker()
    deadline = time.monotonic() + 30
    while True:
        states = [api.task(t["id"]) for t in tasks]
        if [s["status"] for s in states] == ["PROCESSING"] * 3 + ["PENDING"] * 2:
            break
        assert time.monotonic() < deadline, [s["status"] for s in states]
        time.sleep(0.05)
    assert [s["queuePosition"] for s in states] == [None, None, None, 1, 2]
    for t in tasks:
        api.mutate("cancelExport", t["id"])


def test_the_worker_takes_the_count_made_when_the_export_was_requested(idle_queue, redis_url):
    import redis

    api = idle_queue.api()
    task = api.export(dataset="samples", format="JSON")
    assert api.task(task["id"])["progress"]["totalRows"] == DEMO_ROWS  # counted by the request, kept
    # A worker that counted again would report DEMO_ROWS while it writes; this one reports the
    # request's count (planted here), and at the end the rows it wrote.
    client = redis.Redis.from_url(redis_url)
    client.hset(f"dataport:task:{task['id']}", "total_rows", DEMO_ROWS + 1000)
    client.close()
    idle_queue.start_worker()
    totals = set()
    deadline = time.monotonic() + 60
    while (t := api.task(task["id"]))["status"] != "SUCCEEDED":
        assert time.monotonic() < deadline and t["status"] in ("PENDING", "PROCESSING"), t
        if t["status"] == "PROCESSING" and t["progress"]["processedRows"]:
            totals.add(t["progress"]["totalRows"])
        time.sleep(0.02)
    assert totals == {DEMO_ROWS + 1000}
    assert t["rowCount"] == DEMO_ROWS and t["progress"]["totalRows"] == DEMO_ROWS


def test_a_retry_counts_again_as_a_request_does(idle_queue):
    api = idle_queue.api()
    task = api.export(dataset="small_limit", format="CSV", limit=5)  # the dataset's maximum is 5
    assert api.task(task["id"])["progress"]["totalRows"] == 5
    assert api.mutate("cancelExport", task["id"])["task"]["status"] == "CANCELLED"
    retried = api.mutate("retryExport", task["id"])
    # a new run starts clean, with the count made for it (held to the maximum, as a request is)
    assert retried["userErrors"] == [] and retried["task"]["run"] == 2
    assert retried["task"]["progress"]["totalRows"] == 5 and retried["task"]["progress"]["processedRows"] == 0
    api.mutate("cancelExport", task["id"])


def test_a_transient_failure_succeeds_on_a_retry(idle_queue, test_data):
    api = idle_queue.api()
    task = api.export(dataset="lockable", format="CSV")  # counted before the lock is taken
    first_attempt_fails_on_a_lock(api, task["id"], test_data.lockable_db, idle_queue.start_worker)
    done = api.wait(task["id"])
    assert done["status"] == "SUCCEEDED" and done["attempts"] >= 2 and done["rowCount"] == 2_000
    retry_event = next(e for e in done["events"] if "attempt 1 failed" in (e["message"] or ""))
    assert "locked" in retry_event["message"] and retry_event["status"] == "PENDING"


def test_a_killed_worker_is_replaced_and_the_file_is_byte_identical(idle_queue):
    request = {"dataset": "samples", "format": "CSV", "sort": [{"field": "collected_on"}]}
    first_worker = idle_queue.start_worker()
    api = idle_queue.api()
    task = api.export(**request)
    deadline = time.monotonic() + 60
    while api.task(task["id"])["progress"]["processedRows"] < 5_000:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    idle_queue.kill(first_worker)
    assert api.task(task["id"])["status"] == "PROCESSING"
    idle_queue.start_worker()
    done = api.wait(task["id"], timeout=120)
    assert done["status"] == "SUCCEEDED" and done["attempts"] == 2
    assert any("previous attempt's worker stopped" in (e["message"] or "") for e in done["events"])
    assert _no_partials(idle_queue, task["id"])
    reference, content = idle_queue.api().run_export(**request)  # another owner, one uninterrupted run
    assert done["checksumSha256"] == reference["checksumSha256"]
    assert hashlib.sha256(api.download(done["downloadUrl"]).content).hexdigest() == hashlib.sha256(content).hexdigest()


# -- retention ----------------------------------------------------------------------------------


async def test_retention_deletes_the_file_and_shows_the_task_expired(local_stack):
    import datetime as dt

    from tasks.services import Services
    from tasks.store import EXPIRY_KEY
    from workers.cron import expire_tasks
    from workers.worker import worker_settings

    api = local_stack.api()
    request = {"dataset": "special", "format": "JSON", "columns": ["id", "name"]}
    task, _ = await asyncio.to_thread(api.run_export, **request)
    finished, expires = (dt.datetime.fromisoformat(task[k]) for k in ("finishedAt", "expiresAt"))
    assert (expires - finished).total_seconds() == pytest.approx(7 * 86400, abs=2)
    assert any(job.coroutine is expire_tasks for job in worker_settings(local_stack.settings)["cron_jobs"])

    services = await Services.start(local_stack.settings)
    try:
        await services.redis.zadd(EXPIRY_KEY, {task["id"]: 0})  # as if the seven days had passed
        assert await expire_tasks({"services": services}) >= 1
    finally:
        await services.close()

    expired = await asyncio.to_thread(api.task, task["id"])
    assert expired["status"] == "EXPIRED" and expired["downloadUrl"] is None
    assert expired["events"][-1]["message"] == "expired after 7 days; the file was deleted"
    assert (await asyncio.to_thread(httpx.get, task["downloadUrl"])).status_code == 404
    again = await asyncio.to_thread(api.export, **request)
    assert again["id"] == task["id"] and again["run"] == 2 and again["status"] in ("PENDING", "PROCESSING")


def test_cancel_on_s3_leaves_no_multipart_upload_and_no_object(s3_stack):
    api = s3_stack.api()
    task = api.export(dataset="samples", format="JSON")
    deadline = time.monotonic() + 60
    while api.task(task["id"])["progress"]["bytes"] < 20 * 1024 * 1024:  # some parts are uploaded
        assert time.monotonic() < deadline
        time.sleep(0.05)
    settings = s3_stack.settings
    s3 = client_for(settings)
    prefix = f"exports/{_owner_of(api)}/{task['id']}/"
    assert s3.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=prefix).get("Uploads")
    assert api.mutate("cancelExport", task["id"])["task"]["status"] == "CANCELLED"
    cancelled_at = time.monotonic()
    while s3.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=prefix).get("Uploads"):
        assert time.monotonic() - cancelled_at < 2.0, "the multipart upload outlived the cancel by 2 s"
        time.sleep(0.05)
    assert s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=prefix).get("KeyCount") == 0
    assert api.task(task["id"])["status"] == "CANCELLED"


def _owner_of(api: Api) -> str:
    import jwt

    return jwt.decode(api.token, options={"verify_signature": False})["sub"]
