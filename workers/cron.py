"""Scheduled jobs: expire finished tasks and their files after the retention period."""

from __future__ import annotations

import logging
from typing import Any

from dataport.services import Services
from tasks.models import FINAL_STATUSES, TaskStatus
from tasks.store import EXPIRY_KEY

log = logging.getLogger("dataport.cron")


async def expire_tasks(ctx: dict[str, Any]) -> int:
    """Delete the files of tasks past their retention and show the tasks as EXPIRED."""
    services: Services = ctx["services"]
    days = services.settings.retention_seconds / 86400
    expired = 0
    for task_id in await services.store.due_for_expiry():
        task = await services.store.get(task_id)
        if task is None or task.status not in FINAL_STATUSES or task.status is TaskStatus.EXPIRED:
            await services.redis.zrem(EXPIRY_KEY, task_id)
            continue
        if task.object_key:
            await services.storage.delete(task.object_key)
        await services.store.expired(task, f"expired after {days:g} days; the file was deleted")
        expired += 1
    if expired:
        log.info("expired %d tasks", expired)
    return expired
