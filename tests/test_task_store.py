"""The task store on a real Redis: ids, reuse, guarded transitions, fencing, events, history."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
from redis.asyncio import Redis

from tasks.fanout import TaskFanout
from tasks.ids import task_id
from tasks.models import TaskKind, TaskStatus, stamp
from tasks.store import TaskStore, channel
from tasks.watch import watch


@pytest.fixture
async def store(redis_url):
    redis = Redis.from_url(redis_url, decode_responses=True)
    yield TaskStore(redis)
    await redis.aclose()


def _fields(tid: str, owner: str, dataset: str = "samples") -> dict:
    return {
        "id": tid,
        "kind": "export",
        "owner": owner,
        "dataset": dataset,
        "format": "CSV",
        "request": "{}",
        "status": "PENDING",
        "created_at": stamp(),
        "attempts": 0,
    }


async def _new(store: TaskStore, owner: str | None = None, reuse: float = 600):
    owner = owner or f"o-{uuid.uuid4().hex[:8]}"
    tid = task_id(owner, "export", "samples", {"n": uuid.uuid4().hex})
    return await store.request(tid, _fields(tid, owner), reuse_seconds=reuse)


def test_ids_are_deterministic_and_differ_by_every_part():
    base = task_id("ann", "export", "samples", {"columns": ["a"], "format": "CSV"})
    assert base == task_id("ann", "export", "samples", {"format": "CSV", "columns": ["a"]})  # key order
    assert len(base) == 24 and base.isalnum() and base == base.lower()
    others = {
        task_id("bob", "export", "samples", {"columns": ["a"], "format": "CSV"}),
        task_id("ann", "import", "samples", {"columns": ["a"], "format": "CSV"}),
        task_id("ann", "export", "other", {"columns": ["a"], "format": "CSV"}),
        task_id("ann", "export", "samples", {"columns": ["b"], "format": "CSV"}),
        task_id("ann", "export", "samples", {"columns": ["a"], "format": "JSON"}),
    }
    assert base not in others and len(others) == 5


async def test_request_creates_then_returns_the_same_task(store):
    first = await _new(store)
    assert first.outcome == "created" and first.task.status is TaskStatus.PENDING and first.task.run == 1
    again = await store.request(first.task.id, _fields(first.task.id, first.task.owner), reuse_seconds=600)
    assert again.outcome == "existing" and again.task.run == 1 and not again.needs_job


async def test_succeeded_task_is_reused_within_the_window_then_rerun(store):
    created = await _new(store)
    tid, owner = created.task.id, created.task.owner
    await store.transition(tid, TaskStatus.PROCESSING, "start", fields={"attempts": 1})
    await store.transition(tid, TaskStatus.SUCCEEDED, "done", fields={"finished_at": stamp(), "row_count": 3})
    assert (await store.request(tid, _fields(tid, owner), reuse_seconds=600)).outcome == "existing"
    rerun = await store.request(tid, _fields(tid, owner), reuse_seconds=0)
    assert rerun.outcome == "rerun" and rerun.task.run == 2 and rerun.task.status is TaskStatus.PENDING
    assert rerun.task.row_count is None, "a new run starts without the previous run's result"
    assert rerun.task.created_at >= created.task.created_at


async def test_an_import_into_the_dataset_ends_reuse(store):
    created = await _new(store)
    tid, owner = created.task.id, created.task.owner
    await store.transition(tid, TaskStatus.PROCESSING, "start", fields={"attempts": 1})
    await store.transition(tid, TaskStatus.SUCCEEDED, "done", fields={"finished_at": stamp()})
    await asyncio.sleep(0.01)
    await store.mark_dataset_written("samples")
    assert (await store.request(tid, _fields(tid, owner), reuse_seconds=600)).outcome == "rerun"


async def test_transitions_follow_the_table(store):
    tid = (await _new(store)).task.id
    refused = await store.transition(tid, TaskStatus.SUCCEEDED, "skip ahead")
    assert not refused.ok and refused.status is TaskStatus.PENDING
    assert (await store.transition(tid, TaskStatus.CANCELLED, "stop")).ok
    late = await store.transition(tid, TaskStatus.PROCESSING, "a worker arrives late")
    assert not late.ok and late.status is TaskStatus.CANCELLED
    assert (await store.get(tid)).status is TaskStatus.CANCELLED
    missing = await store.transition("nope", TaskStatus.CANCELLED, "x")
    assert not missing.ok and missing.status is None


async def test_late_progress_never_revives_or_overwrites(store):
    tid = (await _new(store)).task.id
    await store.transition(tid, TaskStatus.PROCESSING, "attempt 1", fields={"attempts": 1})
    assert await store.progress(tid, 1, {"processed_rows": 10})
    # a second attempt claims the task: the first attempt's writes are fenced off
    await store.transition(tid, TaskStatus.PROCESSING, "attempt 2", fields={"attempts": 2})
    assert not await store.progress(tid, 1, {"processed_rows": 99})
    finished = await store.transition(tid, TaskStatus.SUCCEEDED, "stale", fence_attempt=1)
    assert not finished.ok
    await store.transition(tid, TaskStatus.CANCELLED, "cancel")
    assert not await store.progress(tid, 2, {"processed_rows": 50})
    task = await store.get(tid)
    assert task.status is TaskStatus.CANCELLED and task.progress.processed_rows == 10


async def test_every_transition_is_an_event_with_time_and_reason(store):
    tid = (await _new(store)).task.id
    await store.transition(tid, TaskStatus.PROCESSING, "attempt 1 started", fields={"attempts": 1})
    await store.transition(tid, TaskStatus.FAILED, "source unreadable")
    events = await store.events(tid)
    assert [(e.status, e.message) for e in events] == [
        (TaskStatus.PENDING, "requested"),
        (TaskStatus.PROCESSING, "attempt 1 started"),
        (TaskStatus.FAILED, "source unreadable"),
    ]
    assert events[0].at <= events[1].at <= events[2].at


async def test_snapshots_are_published_and_watch_ends_on_a_final_status(store, redis_url):
    tid = (await _new(store)).task.id
    pubsub = store.redis.pubsub()
    await pubsub.subscribe(channel(tid))
    await store.transition(tid, TaskStatus.PROCESSING, "go", fields={"attempts": 1})
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
    message = message or await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
    assert orjson.loads(message["data"])["status"] == "PROCESSING"
    await pubsub.aclose()

    fanout = TaskFanout.connect(store.redis, redis_url)
    await fanout.start()
    seen = []

    async def follow():
        async for task in watch(fanout, tid):
            seen.append((task.status, task.progress.processed_rows))

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.2)
    for rows in (100, 200, 300):
        await store.progress(tid, 1, {"processed_rows": rows})
    await store.transition(tid, TaskStatus.SUCCEEDED, "done")
    await asyncio.wait_for(follower, 5)
    await fanout.stop()
    assert seen[0] == (TaskStatus.PROCESSING, 0)
    assert seen[-1][0] is TaskStatus.SUCCEEDED
    rows_seen = [r for _, r in seen]
    assert rows_seen == sorted(rows_seen) and 300 in rows_seen


async def test_watch_offers_every_snapshot_after_the_first_to_its_push_and_yields_what_it_declines(store, redis_url):
    """The direct push's contract (api/subscription_push.py): the first snapshot is always yielded;
    each later one goes to the push, and only what it declines is yielded, in version order, so the
    two together are exactly the snapshots a watcher without a push sees."""
    tid = (await _new(store)).task.id
    fanout = TaskFanout.connect(store.redis, redis_url, max_pushes_per_second=1e6)  # nothing coalesced away
    await fanout.start()
    pushed: list[int] = []
    yielded: list[int] = []
    first = asyncio.Event()

    async def push(task) -> bool:
        if task.progress.processed_rows % 200:  # declines 200, 400, …
            pushed.append(task.version)
            return True
        return False

    async def follow():
        async for task in watch(fanout, tid, push):
            yielded.append(task.version)
            first.set()

    follower = asyncio.create_task(follow())
    try:
        await asyncio.wait_for(first.wait(), 5)
        await store.transition(tid, TaskStatus.PROCESSING, "go", fields={"attempts": 1})
        for rows in range(100, 1100, 100):
            await store.progress(tid, 1, {"processed_rows": rows})
            await asyncio.sleep(0.03)
        await store.transition(tid, TaskStatus.SUCCEEDED, "done", fields={"processed_rows": 1100})
        await asyncio.wait_for(follower, 5)
    finally:
        follower.cancel()
        await fanout.stop()
    final = (await store.get(tid)).version
    every = sorted(pushed + yielded)
    assert len(set(every)) == len(every)  # nothing twice
    assert pushed == sorted(pushed) and yielded == sorted(yielded)
    assert yielded[0] == every[0]  # the first snapshot is yielded, never pushed
    assert pushed[-1] == final  # the final one goes to the push too
    assert len(pushed) >= 5 and len(yielded) >= 3  # the odd hundreds pushed; PROCESSING, 200, 400, … yielded


async def test_history_pages_newest_first_with_status_filter(store):
    owner = f"o-{uuid.uuid4().hex[:8]}"
    ids = []
    for _ in range(5):
        ids.append((await _new(store, owner)).task.id)
        await asyncio.sleep(0.002)
    await store.transition(ids[1], TaskStatus.CANCELLED, "x")
    first = await store.page(owner, TaskKind.EXPORT, 2)
    assert [t.id for t in first.tasks] == [ids[4], ids[3]] and first.has_next and first.total == 5
    second = await store.page(owner, TaskKind.EXPORT, 2, after=first.end_cursor)
    assert [t.id for t in second.tasks] == [ids[2], ids[1]] and second.has_next
    last = await store.page(owner, TaskKind.EXPORT, 2, after=second.end_cursor)
    assert [t.id for t in last.tasks] == [ids[0]] and not last.has_next
    cancelled = await store.page(owner, TaskKind.EXPORT, 10, status=TaskStatus.CANCELLED)
    assert [t.id for t in cancelled.tasks] == [ids[1]] and cancelled.total == 1
    assert (await store.page("somebody-else", TaskKind.EXPORT, 10)).tasks == []
