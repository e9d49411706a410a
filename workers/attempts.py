"""One attempt of a job, as exports and imports both run it: claim, retry, fail, succeed.

An attempt claims its task (PENDING, or PROCESSING left by a dead worker) by bumping ``attempts``;
every later write is fenced on that number, so a stale attempt can never overwrite a newer one or
revive a cancelled task.

A transient failure is tried again after an exponential, jittered pause (``backoff``). A run gives
up after ``max_tries`` tries, but never before ``retry_window_seconds`` have passed since its first
failure: a storage or database restart of a minute is ridden out, while a lock held for a moment
costs a one-second pause. arq is told how many tries that can take (``tries_allowed``).
"""

from __future__ import annotations

import random
import socket

import redis.exceptions
from arq import Retry

from dataport.settings import Settings
from sources.base import TransientSourceError
from tasks.models import Task, TaskStatus, now, parse_stamp, stamp
from tasks.notifications import NOTIFIED_STATUSES, task_finished
from tasks.services import Services
from tasks.store import TransitionResult

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
    settings = services.settings
    if attempt > tries_allowed(settings) or (
        resumed and attempt > settings.max_tries and _retrying_for(task) >= settings.retry_window_seconds
    ):
        # arq grants one try beyond tries_allowed so that this, not a silent drop, ends the task;
        # a worker that keeps dying (a file that crashes it) ends it after max_tries
        gave_up = await store.transition(
            task_id,
            TaskStatus.FAILED,
            f"gave up: the worker running attempt {attempt - 1} stopped",
            allowed_from=[TaskStatus.PENDING, TaskStatus.PROCESSING],
            fields={
                "finished_at": stamp(),
                "error_code": "TRANSIENT_ERROR",
                "error_message": f"Gave up after {attempt - 1} attempts; the last worker stopped mid-{what}.",
            },
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
        fields={
            "attempts": attempt,
            "started_at": stamp(),
            "processed_rows": 0,
            "bytes": 0,
            "rows_per_second": None,
            "eta_seconds": None,
        },
    )
    return task if claimed.ok else None


def backoff(settings: Settings, attempt: int) -> float:
    """The pause after failed try ``attempt``: retry_delay_seconds doubled per try, at most
    retry_max_delay_seconds, half of it fixed and half random, so that the tasks a restart failed
    together do not all come back together."""
    # Annotated: an int power has no static type (a negative exponent makes a float).
    ceiling: float = min(settings.retry_max_delay_seconds, settings.retry_delay_seconds * 2 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def tries_allowed(settings: Settings) -> int:
    """Tries one run may take: max_tries, or as many as the retry window needs if every pause is
    as short as ``backoff`` can make it."""
    tries, waited = 1, 0.0
    while tries < settings.max_tries or (waited < settings.retry_window_seconds and tries < 1000):
        waited += min(settings.retry_max_delay_seconds, settings.retry_delay_seconds * 2 ** (tries - 1)) / 2
        tries += 1
    return tries


def _retrying_for(task: Task) -> float:
    """Seconds since this run's first transient failure; 0 if it has had none."""
    run, _, since = (task.retrying_since or "").partition("@")
    if run != str(task.run) or not since:
        return 0.0
    return (now() - parse_stamp(since)).total_seconds()


async def retry_or_fail(services: Services, task: Task, attempt: int, error: BaseException) -> str:
    settings = services.settings
    reason = str(error) or type(error).__name__
    elapsed = _retrying_for(task)
    if attempt >= tries_allowed(settings) or (
        attempt >= settings.max_tries and elapsed >= settings.retry_window_seconds
    ):
        over = f" over {elapsed:.0f} s" if elapsed >= 1 else ""
        return await fail(
            services,
            task,
            attempt,
            "TRANSIENT_ERROR",
            f"Gave up after {attempt} attempts{over}; the last one failed with: {reason}",
        )
    delay = backoff(settings, attempt)
    first_failure = task.retrying_since if elapsed else f"{task.run}@{stamp()}"
    moved = await services.store.transition(
        task.id,
        TaskStatus.PENDING,
        f"attempt {attempt} failed: {reason}; retrying in {delay:.1f}s",
        allowed_from=[TaskStatus.PROCESSING],
        fence_attempt=attempt,
        fields={"retrying_since": first_failure},
    )
    if not moved.ok:
        return "stopped"
    raise Retry(defer=delay)


async def fail(services: Services, task: Task, attempt: int, code: str, message: str, **fields: object) -> str:
    failed = await services.store.transition(
        task.id,
        TaskStatus.FAILED,
        message,
        allowed_from=[TaskStatus.PROCESSING],
        fence_attempt=attempt,
        fields={"finished_at": stamp(), "error_code": code, "error_message": message, **fields},
    )
    if failed.ok:
        await task_finished(services, task)
    return "failed"


async def succeed(
    services: Services, task: Task, attempt: int, message: str, rows: int, size: int, **fields: object
) -> TransitionResult:
    """The attempt's last write: SUCCEEDED, every one of ``rows`` processed, ``size`` bytes, nothing
    left to wait for, and the job's own ``fields``. Not ``ok`` when the task moved on (cancelled)."""
    return await services.store.transition(
        task.id,
        TaskStatus.SUCCEEDED,
        message,
        allowed_from=[TaskStatus.PROCESSING],
        fence_attempt=attempt,
        fields={
            "finished_at": stamp(),
            "processed_rows": rows,
            "total_rows": rows,
            "bytes": size,
            "eta_seconds": 0,
            "row_count": rows,
            **fields,
        },
    )
