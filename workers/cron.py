"""Scheduled jobs: expire finished tasks and their files after the retention period; sweep away
partial writes that no running job can still own."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from tasks.models import FINAL_STATUSES, TaskStatus, now
from tasks.services import Services
from tasks.store import EXPIRY_KEY

log = logging.getLogger("dataport.cron")


async def expire_tasks(ctx: dict[str, Any]) -> int:
    """Delete the files of tasks past their retention and show the tasks as EXPIRED. An import
    still waiting for its upload when its window closed expires too, with whatever was uploaded."""
    services: Services = ctx["services"]
    days = services.settings.retention_seconds / 86400
    expired = 0
    for task_id in await services.store.due_for_expiry():
        task = await services.store.get(task_id)
        waiting = task is not None and task.status is TaskStatus.WAITING_FOR_UPLOAD
        if task is None or (task.status not in FINAL_STATUSES and not waiting) or task.status is TaskStatus.EXPIRED:
            await services.redis.zrem(EXPIRY_KEY, task_id)
            continue
        for key in (task.object_key, task.report_key, task.results_key):
            if key:
                await services.storage.delete(key)
        reason = "no file was uploaded in time" if waiting else f"expired after {days:g} days; the file was deleted"
        await services.store.expired(task, reason)
        expired += 1
    if expired:
        log.info("expired %d tasks", expired)
    return expired


async def sweep_incomplete(ctx: dict[str, Any]) -> int:
    """Abort open multipart uploads and delete ``.partial-`` files begun longer ago than the
    longest job can run: a worker killed mid-write, or one that gave up while the storage was
    down, could not remove its own. (On S3, a bucket lifecycle rule that aborts incomplete
    multipart uploads after a day is the second line; README, "Faults".)"""
    services: Services = ctx["services"]
    settings = services.settings
    older_than = now() - dt.timedelta(seconds=settings.job_timeout_seconds + settings.worker_lease_seconds)
    swept = await services.storage.sweep_incomplete(older_than)
    if swept:
        log.info("swept %d partial writes begun before %s", swept, older_than.isoformat(timespec="seconds"))
    return swept
