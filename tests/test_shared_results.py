"""Subscription results shared per snapshot (``api/subscription_results.py``), against a real
``dataport api`` and Redis: many subscribers of one task with one query cost one execution per
snapshot, and get the same bytes; fields that depend on the caller (``downloadUrl``, ``upload``)
are never handed from one caller to another, even with the same query on the same snapshot.

No worker runs: each test drives its task through the real task store scripts (tests/fanout_client.py).
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
import websockets
from graphql import ExecutionResult
from redis.asyncio import Redis

from api.auth import issue_token
from api.subscription_results import SHARED, SharedResults, caller_fields, frame
from api.subscription_slots import take_slot
from schema import schema
from tasks.models import TaskStatus, stamp
from tests.client import Api
from tests.fanout_client import PROGRESS, Driver, Subscriber, subscriber
from tests.fixtures.stack import Stack, _stack

SUBSCRIBERS = 40
ORDERS = [(1, "acme", 10.0), (2, "acme", 20.0), (3, "globex", 30.0)]
DATASETS = """
[datasets.orders]
source = "sqlite"
url = "{db}"
table = "orders"
key = ["id"]
readers = ["role:analyst"]
scope = {{ column = "org_id", claim = "org.id" }}

[datasets.notes]
source = "sqlite"
url = "{db}"
table = "notes"
key = ["id"]
importable = true
"""
# One document for everyone: only the caller tells the results apart.
WITH_LINK = "subscription($id: ID!) { exportProgress(id: $id) { id status downloadUrl progress { processedRows } } }"
WITH_UPLOAD = "subscription($id: ID!) { importProgress(id: $id) { id status upload { url method } } }"


@pytest.fixture(scope="module")
def shared_datasets(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("shared-data")
    db = d / "shared.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, org_id TEXT, amount REAL)")
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?)", ORDERS)
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        conn.executemany("INSERT INTO notes VALUES (?, ?)", [(1, "one"), (2, "two")])
    datasets = d / "datasets.toml"
    datasets.write_text(DATASETS.format(db=db))
    return SimpleNamespace(datasets_file=datasets)


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory, redis_url, shared_datasets) -> Iterator[Stack]:
    extra = {"DATAPORT_STORAGE": "local", "DATAPORT_MAX_SUBSCRIPTIONS_PER_USER": "500", "DATAPORT_ADMIN_ROLE": "ops"}
    yield from _stack("shared", tmp_path_factory, redis_url, shared_datasets, extra, workers=0)


def _token(stack: Stack, user: str, roles: tuple[str, ...] = (), org: str | None = None) -> str:
    claims = {"org": {"id": org}} if org is not None else None
    return issue_token(stack.settings, user, roles=roles, claims=claims)


def _metric(stack: Stack, name: str) -> float:
    text = httpx.get(f"{stack.url}/metrics", timeout=30).text
    match = re.search(rf"^{name}_total (\S+)$", text, re.MULTILINE)
    assert match, f"{name} is not at /metrics"
    return float(match.group(1))


async def _until(condition, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _finish_with_file(driver: Driver, task_id: str, rows: int) -> None:
    """SUCCEEDED with a file in storage, as a worker leaves it: downloadUrl resolves from here on."""
    fields = {"finished_at": stamp(), "row_count": rows, "processed_rows": rows, "object_key": f"exports/{task_id}.csv"}
    result = await driver.store.transition(task_id, TaskStatus.SUCCEEDED, "done", fields=fields)
    assert result.ok, result


async def _legacy(stack: Stack, token: str, query: str, variables: dict) -> tuple[list[dict], asyncio.Task]:
    """One subscription over the legacy graphql-ws protocol: its ``data`` payloads as they come."""
    ws = await websockets.connect(stack.url.replace("http", "ws", 1) + "/graphql", subprotocols=["graphql-ws"])
    await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}))
    assert json.loads(await ws.recv())["type"] == "connection_ack"
    await ws.send(json.dumps({"id": "1", "type": "start", "payload": {"query": query, "variables": variables}}))
    received: list[dict] = []

    async def read() -> None:
        async with ws:
            async for raw in ws:
                message = json.loads(raw)
                if message["type"] == "data":
                    received.append(message["payload"])
                elif message["type"] == "complete":
                    return

    return received, asyncio.create_task(read())


async def test_a_running_execution_is_awaited_not_repeated_and_kept_only_a_few_seconds():
    shared = SharedResults(ttl=0.3)
    runs = 0
    release = asyncio.Event()

    async def execute() -> ExecutionResult:
        nonlocal runs
        runs += 1
        await release.wait()
        return ExecutionResult(data={"status": "PROCESSING", "run": runs})

    first = asyncio.ensure_future(shared.result(("task", 7), execute))  # type: ignore[arg-type]
    leaving = asyncio.ensure_future(shared.result(("task", 7), execute))  # type: ignore[arg-type]
    staying = asyncio.ensure_future(shared.result(("task", 7), execute))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    leaving.cancel()  # a subscriber that goes away does not cancel the execution the others wait for
    release.set()
    result = await first
    assert (await staying) is result and runs == 1 and shared.executions == 1 and shared.shared == 2
    assert shared.result(("task", 7), execute) is result  # done: handed out as it is
    assert shared.payload({"data": result.data}) == '{"data":{"status":"PROCESSING","run":1}}'
    assert shared.payload({"data": dict(result.data)}) is None  # equal, but not the shared object
    await asyncio.sleep(0.35)
    again = await shared.result(("task", 7), execute)  # type: ignore[misc]
    assert again is not result and runs == 2  # older than the TTL: executed anew (signed links expire)
    assert shared.payload({"data": result.data}) is None


async def test_a_shared_result_goes_out_as_one_encoding_with_each_operation_id():
    result = SHARED.result(("frame-test",), lambda: ExecutionResult(data={"exportProgress": {"id": "a"}}))
    assert isinstance(result, ExecutionResult)
    data = result.data
    assert json.loads(frame({"id": "7", "type": "next", "payload": {"data": data}})) == {
        "id": "7",
        "type": "next",
        "payload": {"data": {"exportProgress": {"id": "a"}}},
    }
    assert json.loads(frame({"id": 'q"1', "type": "data", "payload": {"data": data}}))["id"] == 'q"1'
    assert frame({"id": "7", "type": "next", "payload": {"data": data, "errors": []}}) is None
    assert frame({"id": "7", "type": "next", "payload": {"data": {"exportProgress": {"id": "a"}}}}) is None
    assert frame({"type": "connection_ack"}) is None


def test_the_fields_kept_per_caller_are_the_ones_that_read_the_caller():
    """Default-deny: every resolver that takes ``info`` is kept per caller unless SHARED_FIELDS
    names it (so the import fields that read the caller, resultsUrl, preview, failedSamples, are
    too, without anyone listing them); the snapshot's own fields and the shared ones are not."""
    fields = caller_fields(schema._schema)
    assert {"downloadUrl", "upload", "errorReportUrl"} <= fields
    assert not fields & {"id", "status", "progress", "owner", "events", "queuePosition", "pollAfterSeconds"}


async def test_many_subscribers_with_one_query_cost_one_execution_per_snapshot(shared_stack, redis_url):
    user = "shared-many"
    api = Api(shared_stack.url, _token(shared_stack, user))
    task_id = api.export(dataset="notes", format="CSV")["id"]
    token = _token(shared_stack, user)
    executions = _metric(shared_stack, "dataport_subscription_executions")
    results = _metric(shared_stack, "dataport_subscription_results")
    direct = _metric(shared_stack, "dataport_subscription_direct_pushes")
    gate = asyncio.Semaphore(20)

    async def one() -> Subscriber:
        async with gate:
            return await subscriber(shared_stack.url, token, PROGRESS, {"id": task_id})

    subs = list(await asyncio.gather(*(one() for _ in range(SUBSCRIBERS))))
    legacy, legacy_reader = await _legacy(shared_stack, token, PROGRESS, {"id": task_id})
    driver = Driver(redis_url)
    try:
        await _until(lambda: all(s.first_ready() for s in subs) and legacy, 30, "every first snapshot")
        await driver.start(task_id)
        for step in range(1, 9):
            await driver.progress(task_id, step, 10)
            await asyncio.sleep(0.1)
        await driver.finish(task_id, 10)
        await _until(lambda: all(s.ended.get("1") == "complete" for s in subs), 30, "every subscription to end")

        await asyncio.wait_for(legacy_reader, 30)
        delivered = [[p for _, p in s.received["1"]] for s in subs] + [legacy]
        by_snapshot: dict[tuple[str, int], list[dict]] = {}
        for payloads in delivered:
            for p in payloads:
                snap = p["data"]["exportProgress"]
                by_snapshot.setdefault((snap["status"], snap["progress"]["processedRows"]), []).append(p)
        for key, payloads in by_snapshot.items():  # the same payload, to the byte, for everyone
            assert all(p == payloads[0] for p in payloads), key
        assert {s for s, _ in by_snapshot} >= {"PENDING", "PROCESSING", "SUCCEEDED"}

        executed = _metric(shared_stack, "dataport_subscription_executions") - executions
        handed = _metric(shared_stack, "dataport_subscription_results") - results
        # One execution per snapshot that went out, however many subscribers took it.
        assert executed == len(by_snapshot), (executed, sorted(by_snapshot))
        assert handed == sum(len(p) for p in delivered)
        assert handed >= (SUBSCRIBERS + 1) * 3
        # Every snapshot after each subscription's first went straight to its socket, on both
        # protocols (api/subscription_push.py); the first ones went through Strawberry.
        pushed = _metric(shared_stack, "dataport_subscription_direct_pushes") - direct
        assert pushed == handed - (SUBSCRIBERS + 1), (pushed, handed)
    finally:
        legacy_reader.cancel()
        await asyncio.gather(*(s.close() for s in subs), return_exceptions=True)
        await driver.close()


async def test_a_download_link_never_reaches_another_caller(shared_stack, redis_url):
    """An analyst of acme and an admin of globex follow the analyst's export of acme's rows with the
    same query: only the analyst may read the rows, so only the analyst gets a downloadUrl; the
    admin's null is not handed to the analyst either. Both of them subscribe several times, in turn,
    so that whichever executes first would be the one shared."""
    analyst = _token(shared_stack, "shared-analyst", roles=("analyst",), org="acme")
    admin = _token(shared_stack, "shared-admin", roles=("ops",), org="globex")
    task_id = Api(shared_stack.url, analyst).export(dataset="orders", format="CSV")["id"]
    tokens = [analyst, admin] * 4
    subs = [await subscriber(shared_stack.url, t, WITH_LINK, {"id": task_id}) for t in tokens]
    driver = Driver(redis_url)
    try:
        await _until(lambda: all(s.first_ready() for s in subs), 30, "every first snapshot")
        await driver.start(task_id)
        await driver.progress(task_id, 1, 2)
        await _finish_with_file(driver, task_id, 2)
        await _until(lambda: all(s.ended.get("1") == "complete" for s in subs), 30, "every subscription to end")
        for token, sub in zip(tokens, subs, strict=True):
            final = sub.snapshots()[-1][1]
            assert final["status"] == "SUCCEEDED"
            if token == analyst:
                assert final["downloadUrl"], final
            else:
                assert final["downloadUrl"] is None, final
            assert all(s["downloadUrl"] is None for _, s in sub.snapshots()[:-1])  # no file before
        links = {sub.snapshots()[-1][1]["downloadUrl"] for t, sub in zip(tokens, subs, strict=True) if t == analyst}
        assert len(links) == 1  # the analyst's tabs shared one execution of the snapshot
    finally:
        await asyncio.gather(*(s.close() for s in subs), return_exceptions=True)
        await driver.close()


async def test_an_upload_target_never_reaches_another_caller(shared_stack):
    """The owner of an import waiting for its file gets where to upload it; an admin following the
    same import with the same query, on the same snapshot, gets null."""
    owner = _token(shared_stack, "shared-importer")
    admin = _token(shared_stack, "shared-admin-2", roles=("ops",))
    payload = Api(shared_stack.url, owner).request_import(dataset="notes", format="CSV", fileName="n.csv")
    assert payload["userErrors"] == [], payload
    task_id = payload["task"]["id"]
    tokens = [admin, owner, admin, owner]
    subs = [await subscriber(shared_stack.url, t, WITH_UPLOAD, {"id": task_id}) for t in tokens]
    try:
        await _until(lambda: all(s.first_ready() for s in subs), 30, "every first snapshot")
        for token, sub in zip(tokens, subs, strict=True):
            first = sub.snapshots(field_name="importProgress")[0][1]
            assert first["status"] == "WAITING_FOR_UPLOAD"
            if token == owner:
                assert first["upload"] and first["upload"]["url"], first
            else:
                assert first["upload"] is None, first
    finally:
        await asyncio.gather(*(s.close() for s in subs), return_exceptions=True)


def _renewers() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "subscription-slot-renewer" and not t.done()]


async def test_one_task_renews_every_subscription_slot_of_the_process(redis_url):
    """Slots are leases; a process renews all of its own in one task (not one task per
    subscription), which ends when the last slot is given back."""
    redis = Redis.from_url(redis_url, decode_responses=True)
    namespace = f"renew-{time.monotonic_ns()}"
    try:
        slots = [await take_slot(redis, namespace, user, 10, 0.6) for user in ("ann", "ann", "bob")]
        assert len(_renewers()) == 1
        await asyncio.sleep(1.5)  # more than two leases: only renewals keep them
        for slot in slots:
            assert await redis.zscore(slot.key, slot.member) is not None
        for slot in slots:
            await slot.release()
            await slot.release()  # idempotent
        assert [await redis.zscore(s.key, s.member) for s in slots] == [None, None, None]
        await asyncio.sleep(0.3)  # the renewer wakes, finds nothing held, and ends
        assert _renewers() == []
    finally:
        await redis.aclose()
