"""The arq queue as the task service sees it: enqueue, position, abort.

One arq job per run of a task (``export:{id}:{run}``), so enqueueing twice is a no-op and a new
run never collides with the finished job of the previous one.
"""

from __future__ import annotations

import asyncio
import contextlib

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.jobs import Job

from tasks.models import Task


def job_id_for(task: Task) -> str:
    return f"{task.kind.value}:{task.id}:{task.run}"


async def enqueue(arq: ArqRedis, queue_name: str, function: str, task: Task) -> str:
    job_id = job_id_for(task)
    await arq.enqueue_job(function, task.id, task.run, _job_id=job_id, _queue_name=queue_name)
    return job_id


async def position(arq: ArqRedis, queue_name: str, job_id: str) -> int | None:
    """1 for the next job to start; None once the job is no longer waiting.

    arq keeps a running job in the queue until it finishes, so the jobs ahead that hold an
    in-progress key are running, not waiting, and do not count."""
    rank = await arq.zrank(queue_name, job_id)
    if rank is None:
        return None
    ahead = await arq.zrange(queue_name, 0, rank)
    pipe = arq.pipeline(transaction=False)
    for job in ahead:
        pipe.exists(in_progress_key_prefix + job.decode())
    running = await pipe.execute()
    if running[-1]:
        return None
    return sum(1 for r in running if not r)


async def depth(arq: ArqRedis, queue_name: str) -> int:
    return await arq.zcard(queue_name)


async def abort(arq: ArqRedis, queue_name: str, job_id: str) -> None:
    """Ask arq to abort the job: a waiting job never starts, a running one is cancelled. Does not
    wait for the worker; the task's own status already says CANCELLED."""
    job = Job(job_id, arq, _queue_name=queue_name)
    with contextlib.suppress(asyncio.TimeoutError):
        await job.abort(timeout=0.01, poll_delay=0.01)
