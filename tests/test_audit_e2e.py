"""The audit log end to end: a real ``dataport api`` and ``dataport worker`` (the drain is their
cron job), every event type recorded with its actor, downloads through the local and the S3
backend, a worker SIGKILLed before the drain ran, ``auditEvents`` (admins only, filters, pages) and
``dataport audit verify|export`` on what the stack wrote."""

from __future__ import annotations

import asyncio
import csv
import io
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import orjson
import pytest
import redis

from api.auth import issue_token
from audit import records
from audit.outbox import outbox_key
from audit.records import AuditRecord
from audit.sqlite import SqliteAuditStore
from tests.client import Api
from tests.fixtures.stack import Stack, _stack, _write_broken, _write_lockable, faulty_datasets_toml

AGENT = "audit-test/1.0"
UPLOADED = b"id,text\n9001,new\n"
DATASETS = """
[datasets.notes]
source = "sqlite"
url = "{db}"
table = "notes"
key = ["id"]
importable = true

[datasets.secret]
source = "sqlite"
url = "{db}"
table = "notes"
readers = ["user:boss"]
"""
AUDIT_ENV = {
    "DATAPORT_STORAGE": "local",
    "DATAPORT_ADMIN_ROLE": "ops",
    "DATAPORT_AUDIT_DRAIN_SECONDS": "1",
    "DATAPORT_MUTATION_RATE_PER_USER": "20",
}


def _datasets(base: Path) -> Path:
    db = base / "audit.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        conn.executemany("INSERT INTO notes VALUES (?, ?)", [(i, f"note {i}") for i in range(1, 2001)])
    conn.close()
    broken, lockable = base / "broken.db", base / "lockable.db"
    _write_broken(broken)
    _write_lockable(lockable)
    path = base / "datasets.toml"
    path.write_text(DATASETS.format(db=db) + faulty_datasets_toml(broken, lockable))
    return path


def _audit_stack(name: str, tmp_path_factory, redis_url, extra: dict[str, str]) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp(f"audit-{name}")
    env = {**AUDIT_ENV, "DATAPORT_DATASETS": str(_datasets(base)), **extra}
    data = SimpleNamespace(datasets_file=env["DATAPORT_DATASETS"])
    yield from _stack(f"audit-{name}", tmp_path_factory, redis_url, data, env, workers=1)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def audit_stack(tmp_path_factory, redis_url) -> Iterator[Stack]:
    yield from _audit_stack("local", tmp_path_factory, redis_url, {})


@pytest.fixture(scope="module")
def audit_s3_stack(tmp_path_factory, redis_url, s3_settings_env) -> Iterator[Stack]:
    yield from _audit_stack("s3", tmp_path_factory, redis_url, dict(s3_settings_env))


def client(stack: Stack, user: str | None = None, roles: tuple[str, ...] = ()) -> Api:
    return Api(stack.url, issue_token(stack.settings, user or f"user-{uuid.uuid4().hex[:8]}", roles=roles))


def stored(stack: Stack) -> list[AuditRecord]:
    async def read() -> list[AuditRecord]:
        store = SqliteAuditStore(stack.data_dir / "audit.sqlite3")
        try:
            return [r async for r in store.scan()]
        finally:
            await store.close()

    return asyncio.run(read())


def wait_for(stack: Stack, wanted: Callable[[list[AuditRecord]], bool], timeout: float = 20) -> list[AuditRecord]:
    """The store's records once ``wanted`` holds of them (the drain runs every second)."""
    deadline = time.monotonic() + timeout
    while True:
        found = stored(stack)
        if wanted(found):
            return found
        assert time.monotonic() < deadline, [(r.action, r.pending.actor.user, dict(r.pending.detail)) for r in found]
        time.sleep(0.1)


def of(found: list[AuditRecord], action: str, **where: object) -> list[AuditRecord]:
    def matches(r: AuditRecord) -> bool:
        p = r.pending
        fields = {"user": p.actor.user, "task_id": p.task_id, "dataset": p.dataset, **p.detail}
        return r.action == action and all(fields.get(k) == v for k, v in where.items())

    return [r for r in found if matches(r)]


def test_every_event_is_recorded_with_its_actor(audit_stack):
    user = f"alice-{uuid.uuid4().hex[:6]}"
    alice = client(audit_stack, user, roles=("analyst",))
    other = client(audit_stack)

    task = alice.wait(alice.export(dataset="notes", format="CSV")["id"])
    assert httpx.get(task["downloadUrl"], headers={"User-Agent": AGENT}).status_code == 200
    bad = task["downloadUrl"].replace("signature=", "signature=0")
    assert httpx.get(bad).status_code == 403
    assert other.task(task["id"]) is None  # another owner's task: answered as missing, recorded
    assert other.request_export(dataset="secret", format="CSV")["userErrors"][0]["code"] == "DATASET_NOT_FOUND"
    forbidden = other.gql('{ exportTasks(owner: "someone") { totalCount } }')
    assert forbidden["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    assert Api(audit_stack.url, None).gql("{ datasets { name } }")["errors"][0]["extensions"]["code"] == (
        "UNAUTHENTICATED"
    )

    failed = alice.wait(alice.export(dataset="broken", format="CSV")["id"])
    assert failed["status"] == "FAILED"
    assert alice.mutate("retryExport", failed["id"])["userErrors"] == []
    assert alice.mutate("deleteExport", task["id"])["userErrors"] == []

    waiting = alice.request_import(dataset="notes", format="CSV", fileName="n.csv")["task"]
    assert httpx.put(waiting["upload"]["url"].replace("signature=", "signature=0"), content=b"x").status_code == 403
    assert Api.upload(waiting["upload"], UPLOADED).status_code == 200
    assert alice.import_mutation("cancelImport", waiting["id"])["userErrors"] == []
    streamed = httpx.get(f"{audit_stack.url}/exports/stream", params={"dataset": "notes"}, headers=alice.headers)
    assert streamed.status_code == 200

    spammer = client(audit_stack)
    codes = [spammer.gql('mutation { cancelExport(id: "x") { task { id } } }') for _ in range(21)]
    assert codes[-1]["errors"][0]["extensions"]["code"] == "RATE_LIMITED"

    tid, fid, iid = task["id"], failed["id"], waiting["id"]
    found = wait_for(
        audit_stack,
        lambda rs: bool(of(rs, records.TASK_CANCELLED, task_id=iid)) and bool(of(rs, records.RATE_LIMITED)),
    )
    requested = of(found, records.EXPORT_REQUESTED, task_id=tid, user=user)
    assert requested[0].pending.detail["request"]["format"] == "CSV"
    assert requested[0].pending.actor.roles == ("analyst",) and requested[0].pending.actor.address == "127.0.0.1"
    moves = [(r.pending.detail["from"], r.pending.detail["to"]) for r in of(found, records.TASK_STATUS, task_id=tid)]
    assert moves == [("PENDING", "PROCESSING"), ("PROCESSING", "SUCCEEDED")]
    assert of(found, records.TASK_STATUS, task_id=fid, to="FAILED")[0].pending.detail["reason"]
    download = of(found, records.FILE_DOWNLOADED, task_id=tid)[0].pending
    assert (download.actor.user, download.actor.roles, download.actor.user_agent) == (user, ("analyst",), AGENT)
    assert download.actor.address == "127.0.0.1" and download.dataset == "notes"
    assert of(found, records.ACCESS_DENIED, task_id=tid, reason="download link invalid or expired")
    assert of(found, records.ACCESS_DENIED, task_id=tid, reason="another owner's export")
    assert of(found, records.ACCESS_DENIED, dataset="secret", reason="export: dataset not permitted")
    assert of(found, records.ACCESS_DENIED, reason="FORBIDDEN", owner="someone")
    assert of(found, records.ACCESS_DENIED, reason="UNAUTHENTICATED")
    assert of(found, records.TASK_RETRIED, task_id=fid, user=user, outcome="rerun", run="2")
    assert of(found, records.TASK_DELETED, task_id=tid, user=user)
    assert of(found, records.IMPORT_REQUESTED, task_id=iid, user=user)
    assert of(found, records.ACCESS_DENIED, task_id=iid, reason="upload link invalid or expired")
    assert of(found, records.FILE_UPLOADED, task_id=iid, user=user, size=len(UPLOADED))
    assert of(found, records.TASK_CANCELLED, task_id=iid, user=user, to="CANCELLED")
    assert of(found, records.EXPORT_STREAMED, dataset="notes", user=user)
    assert of(found, records.RATE_LIMITED, limit="mutations")

    # What the stack wrote checks out, and the CLI writes it out.
    env = {**audit_stack.env, "DATAPORT_AUDIT_URL": str(audit_stack.data_dir / "audit.sqlite3")}
    verified = subprocess.run([sys.executable, "-m", "dataport.cli", "audit", "verify"], env=env, capture_output=True)
    assert verified.returncode == 0 and b"OK:" in verified.stderr, verified.stderr
    since = found[0].at
    out = subprocess.run(
        [sys.executable, "-m", "dataport.cli", "audit", "export", "--since", since, "--format", "csv"],
        env=env,
        capture_output=True,
        check=True,
    )
    rows = list(csv.DictReader(io.StringIO(out.stdout.decode())))
    assert {r["id"] for r in rows} >= {r.id for r in found}
    ndjson = subprocess.run(
        [sys.executable, "-m", "dataport.cli", "audit", "export"], env=env, capture_output=True, check=True
    ).stdout.splitlines()
    assert orjson.loads(ndjson[0])["hash"] == found[0].hash


def test_a_download_through_s3_is_recorded_through_the_api(audit_s3_stack):
    user = f"s3-{uuid.uuid4().hex[:6]}"
    api = client(audit_s3_stack, user, roles=("analyst",))
    task = api.wait(api.export(dataset="notes", format="CSV")["id"])
    assert task["downloadUrl"].startswith(f"{audit_s3_stack.url}/files/"), task["downloadUrl"]
    response = httpx.get(task["downloadUrl"], headers={"User-Agent": AGENT}, follow_redirects=True)
    assert response.status_code == 200 and response.content.startswith(b"id,text")
    found = wait_for(audit_s3_stack, lambda rs: bool(of(rs, records.FILE_DOWNLOADED, task_id=task["id"])))
    download = of(found, records.FILE_DOWNLOADED, task_id=task["id"])[0].pending
    assert (download.actor.user, download.actor.roles, download.actor.user_agent) == (user, ("analyst",), AGENT)


def test_a_worker_killed_before_the_drain_loses_no_record(audit_stack, redis_url):
    audit_stack.stop_workers()
    outbox = redis.Redis.from_url(redis_url, decode_responses=True)
    key = outbox_key(audit_stack.env["DATAPORT_QUEUE_NAME"])
    api = client(audit_stack)
    task_id = api.export(dataset="notes", format="NDJSON")["id"]
    audit_stack.env["DATAPORT_AUDIT_DRAIN_SECONDS"] = "0"  # this worker changes statuses, drains nothing
    try:
        doomed = audit_stack.start_worker()
    finally:
        audit_stack.env["DATAPORT_AUDIT_DRAIN_SECONDS"] = "1"
    deadline = time.monotonic() + 30
    while api.task(task_id)["status"] == "PENDING":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    audit_stack.kill(doomed)
    audit_stack.workers.remove(doomed)

    waiting = [f for _, f in outbox.xrange(key) if f.get("task_id") == task_id]
    assert [f["action"] for f in waiting][:2] == [records.EXPORT_REQUESTED, records.TASK_STATUS]
    assert {f["id"] for f in waiting}.isdisjoint(r.id for r in stored(audit_stack))  # not drained yet

    audit_stack.start_worker()  # drains at start-up, and finishes the export if it was cut off
    assert api.wait(task_id)["status"] == "SUCCEEDED"
    found = wait_for(audit_stack, lambda rs: bool(of(rs, records.TASK_STATUS, task_id=task_id, to="SUCCEEDED")))
    ids = [r.id for r in found]
    assert all(ids.count(f["id"]) == 1 for f in waiting)  # every one stored, once
    outbox.close()


AUDIT_EVENTS = """query($taskId: ID, $actor: String, $dataset: String, $since: DateTime, $first: Int, $after: String) {
  auditEvents(taskId: $taskId, actor: $actor, dataset: $dataset, since: $since, first: $first, after: $after) {
    edges { cursor node { id at action actor roles address userAgent taskId dataset detail prevHash hash } }
    pageInfo { hasNextPage endCursor }
  }
}"""


def test_audit_events_are_for_admins_with_filters_and_pages(audit_stack):
    user = f"carol-{uuid.uuid4().hex[:6]}"
    carol = client(audit_stack, user)
    task_id = carol.wait(carol.export(dataset="notes", format="JSON")["id"])["id"]
    admin = client(audit_stack, roles=("ops",))

    refused = carol.gql(AUDIT_EVENTS, {})
    assert refused["errors"][0]["extensions"]["code"] == "FORBIDDEN" and refused["data"] is None

    wait_for(audit_stack, lambda rs: bool(of(rs, records.TASK_STATUS, task_id=task_id, to="SUCCEEDED")))
    events = admin.data(AUDIT_EVENTS, {"taskId": task_id})["auditEvents"]["edges"]
    assert [e["node"]["action"] for e in events] == [records.TASK_STATUS, records.TASK_STATUS, records.EXPORT_REQUESTED]
    assert {e["node"]["taskId"] for e in events} == {task_id} and events[-1]["node"]["actor"] == user
    assert events[0]["node"]["detail"]["to"] == "SUCCEEDED" and events[0]["node"]["prevHash"]

    first = admin.data(AUDIT_EVENTS, {"actor": user, "first": 1})["auditEvents"]
    assert first["pageInfo"]["hasNextPage"] and len(first["edges"]) == 1
    rest = admin.data(AUDIT_EVENTS, {"actor": user, "first": 10, "after": first["pageInfo"]["endCursor"]})
    assert first["edges"][0]["node"]["id"] not in {e["node"]["id"] for e in rest["auditEvents"]["edges"]}
    assert not rest["auditEvents"]["pageInfo"]["hasNextPage"]
    later = admin.data(AUDIT_EVENTS, {"dataset": "notes", "since": "2999-01-01T00:00:00Z"})
    assert later["auditEvents"]["edges"] == []
