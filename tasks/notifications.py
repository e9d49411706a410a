"""Notifications: whether a finished task tells anyone, and queueing the job that does.

A task that reaches SUCCEEDED or FAILED (exports and imports alike) is announced by one arq job,
``notify_task(task_id, run)`` (``workers/notify.py``), when

- its owner should get an email: the request asked for it (``notify: true``, kept in the task hash
  as ``"1"``) or the dataset requires it (``notify = true`` in the datasets file); or
- a webhook is configured (``DATAPORT_WEBHOOK_URL``): every finished task is posted.

The job's id is ``notify:{task_id}:{run}``, so queueing it twice for one run (a re-delivered or
re-claimed job) is refused by arq while the job or its result exists; the job itself records what it
has delivered in Redis (``delivery_key``), which is what keeps a retried job from sending twice.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tasks.models import Task, TaskStatus, stamp

if TYPE_CHECKING:
    from tasks.services import Services

log = logging.getLogger("dataport.notify")

NOTIFY_JOB = "notify_task"
NOTIFIED_STATUSES = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED})


def notify_job_id(task_id: str, run: int) -> str:
    return f"notify:{task_id}:{run}"


def delivery_key(task: Task, channel: str) -> str:
    """Where the job records one channel's delivery (``email`` or ``webhook``) for this run.

    ``created_at`` is part of the key: a deleted export asked for again starts at run 1 once more,
    and must not find the old run's record."""
    return f"dataport:notify:{task.id}:{task.run}:{stamp(task.created_at)}:{channel}"


async def email_requested(services: Services, task: Task) -> bool:
    """The request said ``notify: true``, or the dataset requires notifications."""
    dataset = services.registry.get(task.dataset)
    if dataset is not None and dataset.notify:
        return True
    return task.notify


async def task_finished(services: Services, task: Task) -> None:
    """Queue the notification job for a task that has just reached SUCCEEDED or FAILED, if anyone is
    to be told. Never raises: a notification must not change how the task itself ended."""
    try:
        if not services.settings.webhook_url and not await email_requested(services, task):
            return
        job = await services.arq.enqueue_job(
            NOTIFY_JOB,
            task.id,
            task.run,
            _job_id=notify_job_id(task.id, task.run),
            _queue_name=services.settings.queue_name,
        )
        if job is None:
            log.info("notification of %s %s run %s is queued already", task.kind.value, task.id, task.run)
    except Exception:
        log.exception("could not queue the notification of %s %s run %s", task.kind.value, task.id, task.run)
