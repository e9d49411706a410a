"""The arq queue as the task service sees it: enqueue fairly, position, abort.

One arq job per run of a task (``export:{id}:{run}``), so enqueueing twice is a no-op and a new
run never collides with the finished job of the previous one.

Fairness (DESIGN.md, "Queue fairness"): jobs are taken round-robin between owners, so one owner's
backlog delays another owner's job by at most one job per worker slot. It is start-time fair
queueing with unit cost, kept in arq's own sorted set so that workers need not know owners:

- Each export or import job gets a start tag ``max(vtime, last[owner])`` and the owner's next job
  may start no earlier than the tag after it. ``vtime`` is the largest tag any worker has started,
  so a newcomer joins the round being served now, behind the jobs of that round already waiting,
  and ahead of the rest of a heavy owner's backlog; an owner idle for a while starts afresh.
- The tag (then the arrival) is the job's arq score, placed far in the past (below ``CEILING``,
  in 2004), so the job is due at once and arq's ascending-score order is the fair order.
  ``queuePosition`` is the rank in that order, counting waiting exports and imports only.
- arq scores its own jobs with real time: notifications, cron jobs, and a job retried after a
  transient error (``Retry(defer=...)`` re-scores it to now + pause). Workers start those that are
  due before any tagged job (``workers/fair.py``): they are short, and a retry keeps the turn it
  had. A job whose worker died keeps its score, so it is run again first.
- Workers start only as many jobs as they have free slots and read the queue afresh every time
  (arq would otherwise start the rest of a list read before a newcomer arrived).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from importlib.resources import files
from typing import Any

from arq.connections import ArqRedis
from arq.constants import expires_extra_ms, in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.jobs import Job, serialize_job
from arq.utils import timestamp_ms

from tasks.models import Task, TaskKind

# queue_position.lua defines the function that queue.lua's 'position' and the polled read of a task
# (tasks/reads.py) both call.
POSITION_LUA = files("tasks").joinpath("queue_position.lua").read_text()
_SCRIPT = POSITION_LUA + files("tasks").joinpath("queue.lua").read_text()
_scripts: weakref.WeakKeyDictionary[ArqRedis, Any] = weakref.WeakKeyDictionary()
# Arrivals told apart within one tag; tags below 2**30 keep every tagged score below CEILING.
TIE = 1024
# Scores from here up are arq's own (real time, in ms); below are fair tags (queue.lua).
CEILING = 2**40
# The job id prefixes a queue position counts: exports and imports, not notifications or cron jobs.
COUNTED = " ".join(f"{kind.value}:" for kind in TaskKind)
# How long an owner's last tag is remembered: longer than a job can wait in the queue (a day).
LAST_TAG_TTL_MS = 2 * expires_extra_ms


def _script(arq: ArqRedis) -> Any:
    """queue.lua, registered once per connection pool (EVALSHA after the first call)."""
    if arq not in _scripts:
        _scripts[arq] = arq.register_script(_SCRIPT)
    return _scripts[arq]


def job_id_for(task: Task) -> str:
    return f"{task.kind.value}:{task.id}:{task.run}"


def fair_key(queue_name: str) -> str:
    return f"{queue_name}:fair"


def last_tag_key(queue_name: str, owner: str) -> str:
    return f"{queue_name}:fair:last:{owner}"


async def enqueue(arq: ArqRedis, queue_name: str, function: str, task: Task) -> str:
    """Queue the task's job in its owner's fair turn (a no-op while the job exists)."""
    job_id = job_id_for(task)
    payload = serialize_job(function, (task.id, task.run), {}, None, timestamp_ms(), serializer=arq.job_serializer)
    await _script(arq)(
        keys=[
            queue_name,
            job_key_prefix + job_id,
            result_key_prefix + job_id,
            fair_key(queue_name),
            last_tag_key(queue_name, task.owner),
        ],
        args=["enqueue", job_id, payload, arq.expires_extra_ms, TIE, LAST_TAG_TTL_MS],
    )
    return job_id


async def started(arq: ArqRedis, queue_name: str, job_id: str) -> int:
    """A worker started ``job_id``: the round being served moves up to its tag. Returns it."""
    return int(await _script(arq)(keys=[queue_name, fair_key(queue_name)], args=["started", job_id, TIE, CEILING]))


async def due_first(arq: ArqRedis, queue_name: str, limit: int) -> list[bytes]:
    """The due jobs of arq's own scores (notifications, cron, retries after their pause): started
    before any tagged job."""
    due: list[bytes] = await arq.zrangebyscore(queue_name, CEILING, timestamp_ms(), start=0, num=limit)
    return due


async def position(arq: ArqRedis, queue_name: str, job_id: str) -> int | None:
    """1 for the next job to start; None once the job is no longer waiting.

    arq keeps a running job in the queue until it finishes, so the jobs ahead that hold an
    in-progress key are running, not waiting, and do not count; due jobs of arq's own scores count
    as ahead of every tagged job, since workers take them first. Only exports and imports count:
    a notification or the cron job ahead takes a moment, not a turn."""
    rank = await _script(arq)(keys=[queue_name], args=["position", job_id, *position_args()])
    return None if rank is None else int(rank)


def position_args() -> list[object]:
    """queue_position.lua's arguments after the job id: now, CEILING, arq's in-progress key prefix
    and the job id prefixes that count (exports and imports)."""
    return [timestamp_ms(), CEILING, in_progress_key_prefix, COUNTED]


async def depth(arq: ArqRedis, queue_name: str) -> int:
    waiting: int = await arq.zcard(queue_name)
    return waiting


async def abort(arq: ArqRedis, queue_name: str, job_id: str) -> None:
    """Ask arq to abort the job: a waiting job never starts, a running one is cancelled. Does not
    wait for the worker; the task's own status already says CANCELLED."""
    job = Job(job_id, arq, _queue_name=queue_name)
    with contextlib.suppress(asyncio.TimeoutError):
        await job.abort(timeout=0.01, poll_delay=0.01)
