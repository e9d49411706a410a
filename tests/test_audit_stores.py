"""The audit stores against real servers (a SQLite file, PostgreSQL, dynalite for DynamoDB): every
action written and read back, de-duplication when the drain delivers twice, the hash chain's
verification naming a changed, a deleted and a reordered record, retention with its anchor, and
the outbox → drain → store path through a real Redis, task-store scripts included."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator

import boto3
import psycopg
import pytest
import redis.asyncio

from audit import chain, records
from audit.base import AuditStore, Filters
from audit.cli import verify_store
from audit.drain import drain
from audit.dynamodb import DynamoAuditStore
from audit.outbox import Outbox, outbox_key
from audit.postgres import PostgresAuditStore
from audit.records import Actor, Pending
from audit.sqlite import TABLE, SqliteAuditStore
from tasks.models import TaskStatus
from tasks.store import TaskStore

ALICE = Actor("alice", ("analyst", "admin"), "10.0.0.7", "pytest/1.0")


@pytest.fixture(params=["sqlite", "postgres", "dynamodb"])
async def store(request, tmp_path, postgres_db, dynalite_url) -> AsyncIterator[AuditStore]:
    kind = request.param
    made: AuditStore
    if kind == "sqlite":
        made = SqliteAuditStore(tmp_path / "audit.sqlite3")
    elif kind == "postgres":
        made = PostgresAuditStore(postgres_db, f"audit_{uuid.uuid4().hex[:8]}")
    else:
        made = DynamoAuditStore(f"audit-{uuid.uuid4().hex[:8]}", endpoint_url=dynalite_url)
    try:
        yield made
    finally:
        await made.close()


def every_action() -> list[Pending]:
    """One record of each action, with the detail each carries."""
    detail = {
        records.EXPORT_REQUESTED: {"request": {"format": "CSV", "filters": [{"field": "x", "op": "EQ", "value": 1}]}},
        records.TASK_STATUS: {"from": "PENDING", "to": "PROCESSING", "reason": "attempt 1 started"},
        records.TASK_CANCELLED: {"from": "PROCESSING", "to": "CANCELLED", "reason": "cancelled by the owner"},
        records.FILE_DOWNLOADED: {"key": "exports/alice/t/x.csv"},
        records.FILE_UPLOADED: {"size": 1234, "sha256": "ab" * 32},
        records.ACCESS_DENIED: {"reason": "another owner's export"},
        records.RATE_LIMITED: {"limit": "mutations", "retry_after_seconds": 3},
    }
    return [
        records.pending(action, ALICE, task_id=f"task{i:020d}", dataset="orders", **detail.get(action, {"n": i}))
        for i, action in enumerate(records.ACTIONS)
    ]


async def all_of(store: AuditStore, filters: Filters | None = None) -> list[records.AuditRecord]:
    return [r async for r in store.scan(filters)]


async def test_every_action_is_written_and_read_back(store):
    written = every_action()
    assert await store.append(written) == len(written)
    read = await all_of(store)
    assert [r.pending for r in read] == written  # every field, detail and actor included
    assert [r.seq for r in read] == list(range(1, len(written) + 1))
    assert read[0].prev_hash == chain.GENESIS
    assert all(b.prev_hash == a.hash for a, b in zip(read, read[1:], strict=False))
    assert (await verify_store(store)).broken is None


async def test_a_record_delivered_twice_is_stored_once(store):
    batch = every_action()
    assert await store.append(batch[:5]) == 5
    # The drain died after the store had the batch, before the outbox forgot it: all of it again.
    assert await store.append(batch) == len(batch) - 5
    assert await store.append(batch) == 0
    assert [r.id for r in await all_of(store)] == [r.id for r in batch]
    assert (await verify_store(store)).broken is None


async def test_filters_and_pages_newest_first(store):
    batch = [records.pending(records.TASK_STATUS, ALICE, task_id=f"t{i % 3}", dataset="d", n=i) for i in range(12)]
    batch.append(records.pending(records.ACCESS_DENIED, Actor("bob"), dataset="other"))
    await store.append(batch)
    page = await store.page(Filters(task_id="t1"), 2)
    assert [r.pending.detail["n"] for r in page.records] == [10, 7] and page.has_next
    page = await store.page(Filters(task_id="t1"), 2, page.records[-1].seq)
    assert [r.pending.detail["n"] for r in page.records] == [4, 1] and not page.has_next
    assert [r.action for r in (await store.page(Filters(actor="bob"), 10)).records] == [records.ACCESS_DENIED]
    assert len((await store.page(Filters(dataset="d", since=batch[3].at, until=batch[6].at), 50)).records) == 3


# -- tampering, store by store ------------------------------------------------------------------------


async def tamper(store: AuditStore, how: str, seq: int) -> None:
    """Change (the detail of), delete, or swap with the next one the record at ``seq``, behind the
    store's back, as someone with write access to the database could."""
    if isinstance(store, SqliteAuditStore):
        with sqlite3.connect(store.path) as db:
            if how == "changed":
                db.execute(f"UPDATE {TABLE} SET detail = '{{\"n\":999}}' WHERE seq = ?", [seq])
            elif how == "deleted":
                db.execute(f"DELETE FROM {TABLE} WHERE seq = ?", [seq])
            else:
                db.execute(f"UPDATE {TABLE} SET seq = -1 WHERE seq = ?", [seq])
                db.execute(f"UPDATE {TABLE} SET seq = ? WHERE seq = ?", [seq, seq + 1])
                db.execute(f"UPDATE {TABLE} SET seq = ? WHERE seq = -1", [seq + 1])
    elif isinstance(store, PostgresAuditStore):
        t = store.table
        with psycopg.connect(store.url, autocommit=True) as db:
            if how == "changed":
                db.execute(f"UPDATE {t} SET detail = '{{\"n\":999}}' WHERE seq = %s", [seq])
            elif how == "deleted":
                db.execute(f"DELETE FROM {t} WHERE seq = %s", [seq])
            else:
                db.execute(f"UPDATE {t} SET seq = -1 WHERE seq = %s", [seq])
                db.execute(f"UPDATE {t} SET seq = %s WHERE seq = %s", [seq, seq + 1])
                db.execute(f"UPDATE {t} SET seq = %s WHERE seq = -1", [seq + 1])
    else:
        assert isinstance(store, DynamoAuditStore)
        client, t = store.client, store.table

        def key(n: int) -> dict:
            return {"pk": {"S": "chain"}, "sk": {"N": str(n)}}

        if how == "changed":
            client.update_item(
                TableName=t,
                Key=key(seq),
                UpdateExpression="SET detail = :d",
                ExpressionAttributeValues={":d": {"S": '{"n":999}'}},
            )
        elif how == "deleted":
            client.delete_item(TableName=t, Key=key(seq))
        else:
            a = client.get_item(TableName=t, Key=key(seq))["Item"]
            b = client.get_item(TableName=t, Key=key(seq + 1))["Item"]
            client.put_item(TableName=t, Item={**b, "sk": {"N": str(seq)}})
            client.put_item(TableName=t, Item={**a, "sk": {"N": str(seq + 1)}})


@pytest.mark.parametrize("how", ["changed", "deleted", "reordered"])
async def test_verify_names_the_first_broken_link(store, how):
    batch = [records.pending(records.TASK_STATUS, ALICE, task_id="t", n=i) for i in range(8)]
    await store.append(batch)
    assert (await verify_store(store)).broken is None
    await tamper(store, how, 4)
    broken = (await verify_store(store)).broken
    assert broken is not None
    assert broken.kind == how
    # The record named: the changed one itself; the one after the gap; the one moved up.
    named = {"changed": batch[3], "deleted": batch[4], "reordered": batch[4]}[how]
    assert broken.id == named.id and named.id in broken.message
    assert broken.seq == (5 if how == "deleted" else 4)


async def test_retention_keeps_the_chain_checkable_from_its_anchor(store):
    old = [Pending(records.new_id(), records.time_text(1_000_000 + i), records.TASK_STATUS, ALICE) for i in range(4)]
    new = [records.pending(records.TASK_STATUS, ALICE, n=i) for i in range(3)]
    await store.append(old + new)
    assert await store.prune(records.time_text(2_000_000)) == 4
    kept = await all_of(store)
    assert [r.id for r in kept] == [r.id for r in new]
    assert await store.anchor() == kept[0].prev_hash != chain.GENESIS
    assert (await verify_store(store)).broken is None
    # The chain goes on from the head, and a record taken from the kept part is still seen.
    await store.append([records.pending(records.TASK_STATUS, ALICE, n=9)])
    assert (await verify_store(store)).broken is None
    await tamper(store, "deleted", kept[0].seq)
    assert (await verify_store(store)).broken.id == new[1].id


# -- the outbox, the task store's scripts and the drain, through a real Redis ------------------------


@pytest.fixture
async def redis_decoded(redis_url) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def test_task_changes_reach_the_store_with_their_reasons(redis_decoded, tmp_path):
    key = outbox_key(f"test:{uuid.uuid4().hex[:8]}")
    outbox = Outbox(redis_decoded, key)
    tasks = TaskStore(redis_decoded, retention_seconds=60, audit_outbox=key)
    task_id = f"audit{uuid.uuid4().hex[:19]}"
    fields = {"id": task_id, "kind": "export", "owner": "alice", "dataset": "orders", "format": "CSV"}
    fields |= {"request": "{}", "status": "PENDING", "created_at": "1.0", "attempts": 0}
    await tasks.request(task_id, fields, 600, actor=ALICE, detail={"request": {"format": "CSV"}})
    await tasks.transition(task_id, TaskStatus.PROCESSING, "attempt 1 started", fields={"attempts": 1})
    await tasks.transition(
        task_id, TaskStatus.CANCELLED, "cancelled by the owner", action=records.TASK_CANCELLED, actor=ALICE
    )
    task = await tasks.get(task_id)
    assert task is not None
    await tasks.expired(task, "expired after 7 days")
    await tasks.delete(task, ALICE)
    assert await outbox.length() == 5

    store = SqliteAuditStore(tmp_path / "audit.sqlite3")
    try:
        assert await drain(outbox, store, batch=2) == 5
        assert await outbox.length() == 0
        stored = await all_of(store)
    finally:
        await store.close()
    assert [r.action for r in stored] == [
        records.EXPORT_REQUESTED,
        records.TASK_STATUS,
        records.TASK_CANCELLED,
        records.TASK_EXPIRED,
        records.TASK_DELETED,
    ]
    assert stored[0].pending.detail == {
        "request": {"format": "CSV"},
        "outcome": "created",
        "run": "1",
        "status": "PENDING",
    }
    assert stored[1].pending.detail["from"] == "PENDING" and stored[1].pending.detail["to"] == "PROCESSING"
    assert stored[2].pending.actor == ALICE and stored[2].pending.detail["reason"] == "cancelled by the owner"
    assert stored[3].pending.detail["reason"] == "expired after 7 days"
    assert all(r.pending.task_id == task_id and r.pending.dataset == "orders" for r in stored)


async def test_a_second_drain_of_the_same_batch_stores_nothing_twice(redis_decoded, tmp_path):
    key = outbox_key(f"test:{uuid.uuid4().hex[:8]}")
    outbox = Outbox(redis_decoded, key)
    batch = every_action()
    for record in batch:
        await outbox.append(record)
    store = SqliteAuditStore(tmp_path / "audit.sqlite3")
    try:
        # The first drain wrote the batch and was killed before XDEL: the store has it, the outbox too.
        assert await store.append([records.from_outbox(f) for _, f in await outbox.entries(100)]) == len(batch)
        assert await drain(outbox, store) == len(batch)
        assert await drain(outbox, store) == 0
        assert [r.id for r in await all_of(store)] == [r.id for r in batch]
        assert (await verify_store(store)).broken is None
    finally:
        await store.close()


async def test_the_dynamodb_table_is_made_once_and_shared(dynalite_url):
    table = f"audit-{uuid.uuid4().hex[:8]}"
    one, two = (DynamoAuditStore(table, endpoint_url=dynalite_url) for _ in range(2))
    try:
        await one.append(every_action()[:3])
        await two.append(every_action()[:2])  # writers share the chain: it goes on from the head
        assert (await verify_store(one)).records == 5
        names = boto3.client("dynamodb", endpoint_url=dynalite_url, region_name="us-east-1").list_tables()
        assert table in names["TableNames"]
    finally:
        await one.close()
        await two.close()
