"""Fair queueing (DESIGN.md, "Queue fairness"): jobs are taken round-robin between owners, so one
owner's backlog delays another owner's job by at most one job per worker slot, and
``queuePosition`` tells the order workers really take.

The first tests drive ``tasks/queue.py`` on a bare Redis queue (the order itself); the others run
real api and worker processes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from arq.connections import ArqRedis

from tasks import queue
from tasks.models import TaskKind
from tests.fixtures.stack import Stack


@pytest.fixture
async def arq_redis(redis_url):
    pool = ArqRedis.from_url(redis_url)
    yield pool
    await pool.aclose()


RUN = uuid.uuid4().hex[:6]  # job keys are not per queue: ids of this run only


def _task(owner: str, n: int) -> SimpleNamespace:
    return SimpleNamespace(kind=TaskKind.EXPORT, id=f"{owner}-{n}-{RUN}", run=1, owner=f"{owner}-{RUN}")


def _job(owner: str, n: int) -> str:
    return f"export:{owner}-{n}-{RUN}:1"


async def _order(arq: ArqRedis, name: str) -> list[str]:
    return [job.decode().split(":")[1].rsplit("-", 1)[0] for job in await arq.zrange(name, 0, -1)]


async def test_owners_take_turns_and_each_keeps_its_own_order(arq_redis):
    name = f"test:fair:{uuid.uuid4().hex[:6]}"
    for n in range(5):
        await queue.enqueue(arq_redis, name, "run_export", _task("ann", n))
    for n in range(2):
        await queue.enqueue(arq_redis, name, "run_export", _task("bob", n))
    assert await _order(arq_redis, name) == ["ann-0", "bob-0", "ann-1", "bob-1", "ann-2", "ann-3", "ann-4"]
    # every score is due now (arq takes scores <= now) and none is 0 (arq reads 0 as "gone")
    scores = [s for _, s in await arq_redis.zrange(name, 0, -1, withscores=True)]
    assert all(0 < s < queue.CEILING for s in scores)
    # the same job twice is one job
    await queue.enqueue(arq_redis, name, "run_export", _task("ann", 0))
    assert await arq_redis.zcard(name) == 7


async def test_a_newcomer_joins_the_round_being_served(arq_redis):
    name = f"test:fair:{uuid.uuid4().hex[:6]}"
    for n in range(6):
        await queue.enqueue(arq_redis, name, "run_export", _task("dee", n))
    for n in range(3):  # a worker started dee's first three jobs
        assert await queue.started(arq_redis, name, _job("dee", n)) == n
    await queue.enqueue(arq_redis, name, "run_export", _task("cid", 0))
    assert await _order(arq_redis, name) == ["dee-0", "dee-1", "dee-2", "cid-0", "dee-3", "dee-4", "dee-5"]
    # the three started jobs are running (arq's in-progress keys): cid's job is next to start
    for n in range(3):
        await arq_redis.set(f"arq:in-progress:{_job('dee', n)}", b"1", px=60_000)
    assert await queue.position(arq_redis, name, _job("cid", 0)) == 1
    assert await queue.position(arq_redis, name, _job("dee", 3)) == 2
    assert await queue.position(arq_redis, name, _job("dee", 0)) is None  # running
    # a job of arq's own scoring that is due (a retry after its pause) is taken first; a
    # notification or cron job ahead takes a moment, not a turn, and is not counted
    await arq_redis.zadd(
        name, {_job("dee", 9): int(time.time() * 1000) - 10, f"notify:{RUN}": int(time.time() * 1000) - 10}
    )
    assert await queue.position(arq_redis, name, _job("cid", 0)) == 2
    assert await queue.position(arq_redis, name, _job("dee", 9)) == 1


# -- real workers ------------------------------------------------------------------------------


@contextlib.contextmanager
def _concurrency(stack: Stack, slots: int) -> Iterator[None]:
    """Workers started inside run ``slots`` jobs at once."""
    before = stack.env.get("DATAPORT_WORKER_CONCURRENCY")
    stack.env["DATAPORT_WORKER_CONCURRENCY"] = str(slots)
    try:
        yield
    finally:
        if before is None:
            stack.env.pop("DATAPORT_WORKER_CONCURRENCY")
        else:
            stack.env["DATAPORT_WORKER_CONCURRENCY"] = before


def _heavy(api, n: int) -> dict:
    return api.export(dataset="samples", format="NDJSON", limit=40_000 + n)


def _wait_all(api, tasks: list[dict], timeout: float = 120) -> list[dict]:
    return [api.wait(t["id"], timeout=timeout) for t in tasks]


def _at(task: dict, field: str) -> dt.datetime:
    return dt.datetime.fromisoformat(task[field])


def _started_between(others: list[dict], since: dt.datetime, until: dt.datetime) -> int:
    return sum(1 for t in others if since < _at(t, "startedAt") < until)


def _cleanup(api, tasks: list[dict]) -> None:
    for t in tasks:
        if api.task(t["id"])["status"] in ("PENDING", "PROCESSING"):
            api.mutate("cancelExport", t["id"])


@pytest.mark.parametrize("slots", [1, 2])
def test_a_backlog_delays_another_owner_by_one_job_per_slot(idle_queue, slots):
    ann, bob = idle_queue.api(), idle_queue.api()
    with _concurrency(idle_queue, slots):
        idle_queue.start_worker()
    backlog = [_heavy(ann, n) for n in range(6)]
    deadline = time.monotonic() + 30
    while sum(ann.task(t["id"])["status"] == "PROCESSING" for t in backlog) < slots:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    small = bob.export(dataset="special", format="CSV", limit=3)
    try:
        # every slot is busy with ann's jobs: bob's is next, ahead of the rest of her backlog
        assert bob.task(small["id"])["queuePosition"] == 1
        done = _wait_all(ann, backlog)
        mine = bob.wait(small["id"])
        assert mine["status"] == "SUCCEEDED" and all(t["status"] == "SUCCEEDED" for t in done)
        # ann's jobs that were running when bob asked, and no more: none started in between
        assert _started_between(done, _at(mine, "createdAt"), _at(mine, "startedAt")) == 0
        assert _started_between(done, dt.datetime.min.replace(tzinfo=dt.UTC), _at(mine, "startedAt")) <= slots + 1
        # ann's own jobs keep her order
        assert [t["id"] for t in sorted(done, key=lambda t: _at(t, "startedAt"))] == [t["id"] for t in backlog]
    finally:
        _cleanup(ann, backlog)


def test_queue_position_is_the_order_workers_take(idle_queue):
    ann, bob, cid = idle_queue.api(), idle_queue.api(), idle_queue.api()
    tasks = [_heavy(ann, 10 + n) for n in range(4)] + [
        bob.export(dataset="special", format="CSV", limit=n) for n in (1, 2)
    ]
    tasks.append(cid.export(dataset="special", format="JSON", limit=1))
    apis = [ann] * 4 + [bob] * 2 + [cid]
    try:
        positions = [api.task(t["id"])["queuePosition"] for api, t in zip(apis, tasks, strict=True)]
        # round-robin: ann, bob, cid; then ann, bob; then the rest of ann's (jobs left by earlier
        # tests on this queue may still be ahead)
        first = min(positions)
        assert [p - first + 1 for p in positions] == [1, 4, 6, 7, 2, 5, 3]
        with _concurrency(idle_queue, 1):
            idle_queue.start_worker()
        done = [api.wait(t["id"], timeout=120) for api, t in zip(apis, tasks, strict=True)]
        by_start = sorted(range(len(done)), key=lambda i: _at(done[i], "startedAt"))
        assert [positions[i] for i in by_start] == sorted(positions)
    finally:
        for api, t in zip(apis, tasks, strict=True):
            _cleanup(api, [t])


def test_a_killed_workers_job_runs_again_before_the_rest(idle_queue, redis_url):
    import redis

    ann, bob = idle_queue.api(), idle_queue.api()
    with _concurrency(idle_queue, 1):
        first = idle_queue.start_worker()
    victim = ann.export(dataset="samples", format="CSV", sort=[{"field": "collected_on"}], limit=90_000)
    deadline = time.monotonic() + 60
    while ann.task(victim["id"])["progress"]["processedRows"] < 2_000:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    waiting = [ann.export(dataset="special", format="CSV", limit=n) for n in (1, 2)]
    waiting.append(bob.export(dataset="special", format="CSV", limit=3))
    try:
        idle_queue.kill(first)
        # its claim lapses within the lease (2 s here); until then nobody can tell it is dead
        claim = f"arq:in-progress:export:{victim['id']}:1"
        deadline = time.monotonic() + 30
        while redis.Redis.from_url(redis_url).exists(claim):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with _concurrency(idle_queue, 1):
            idle_queue.start_worker()
        done = ann.wait(victim["id"], timeout=120)
        assert done["status"] == "SUCCEEDED" and done["attempts"] == 2
        rest = [ann.wait(t["id"]) for t in waiting[:2]] + [bob.wait(waiting[2]["id"])]
        assert all(t["status"] == "SUCCEEDED" and _at(t, "startedAt") > _at(done, "startedAt") for t in rest)
    finally:
        _cleanup(ann, [victim, *waiting[:2]])
        _cleanup(bob, waiting[2:])
