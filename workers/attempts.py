"""One attempt of a job, as exports and imports both run it: claim, retry, fail.

An attempt claims its task (PENDING, or PROCESSING left by a dead worker) by bumping ``attempts``;
every later write is fenced on that number, so a stale attempt can never overwrite a newer one or
revive a cancelled task.
"""

from __future__ import annotations

import socket

import redis.exceptions
from arq import Retry

from dataport.services import Services
from sources.base import TransientSourceError
from tasks.models import Task, TaskStatus, stamp
from tasks.notifications import NOTIFIED_STATUSES, task_finished

# Failures that may pass on their own: the next attempt runs after a short pause.
TRANSIENT = (TransientSourceError, OSError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class Failure(Exception):
    """Not retried: the message is what the user sees."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


async def claim(services: Services, task_id: str, run: int, attempt: int, what: str) -> Task | None:
    """The task, now PROCESSING in this attempt; None when there is nothing (more) to do."""
    store = services.store
    task = await store.get(task_id)
    if task is None or task.run != run or task.status not in (TaskStatus.PENDING, TaskStatus.PROCESSING):
        if task is not None and task.run == run and task.status in NOTIFIED_STATUSES:
            await task_finished(services, task)  # this run ended, but its worker may have died before notifying
        return None  # cancelled while waiting, deleted, or superseded by a newer run
    resumed = task.status is TaskStatus.PROCESSING
    if attempt > services.settings.max_tries:
        # arq grants one try beyond max_tries so that this, not a silent drop, ends the task
        gave_up = await store.transition(
            task_id, TaskStatus.FAILED, f"gave up: the worker running attempt {attempt - 1} stopped",
            allowed_from=[TaskStatus.PENDING, TaskStatus.PROCESSING],
            fields={"finished_at": stamp(), "error_code": "TRANSIENT_ERROR",
                    "error_message": f"Gave up after {attempt - 1} attempts; the last worker stopped mid-{what}."},
        )
        if gave_up.ok:
            await task_finished(services, task)
        return None
    claimed = await store.transition(
        task_id,
        TaskStatus.PROCESSING,
        f"attempt {attempt} started on {socket.gethostname()}"
        + (" (the previous attempt's worker stopped)" if resumed else ""),
        allowed_from=[TaskStatus.PENDING, TaskStatus.PROCESSING],
        fields={"attempts": attempt, "started_at": stamp(), "processed_rows": 0, "bytes": 0,
                "rows_per_second": None, "eta_seconds": None},
    )
    return task if claimed.ok else None


async def retry_or_fail(services: Services, task: Task, attempt: int, error: BaseException) -> str:
    reason = str(error) or type(error).__name__
    if attempt >= services.settings.max_tries:
        return await fail(services, task, attempt, "TRANSIENT_ERROR",
                          f"Gave up after {attempt} attempts; the last one failed with: {reason}")
    delay = services.settings.retry_delay_seconds * attempt
    moved = await services.store.transition(
        task.id, TaskStatus.PENDING, f"attempt {attempt} failed: {reason}; retrying in {delay:g}s",
        allowed_from=[TaskStatus.PROCESSING], fence_attempt=attempt,
    )
    if not moved.ok:
        return "stopped"
    raise Retry(defer=delay)


async def fail(services: Services, task: Task, attempt: int, code: str, message: str, **fields: object) -> str:
    failed = await services.store.transition(
        task.id, TaskStatus.FAILED, message, allowed_from=[TaskStatus.PROCESSING], fence_attempt=attempt,
        fields={"finished_at": stamp(), "error_code": code, "error_message": message, **fields},
    )
    if failed.ok:
        await task_finished(services, task)
    return "failed"
