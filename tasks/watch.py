"""Follow one task: its current snapshot, then every change, ending after a final status.

Subscribes to the task's channel *before* reading the snapshot, so no change can fall between the
two; snapshots carry a version, so one seen twice (or out of order) is dropped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import orjson

from tasks.models import Task
from tasks.store import channel

if TYPE_CHECKING:
    from dataport.services import Services

# With no message for this long, read the task again: it may have been deleted (deletion does not
# publish), and this also covers a message lost with a dropped connection.
QUIET_SECONDS = 5.0


async def watch(services: Services, task_id: str) -> AsyncIterator[Task]:
    pubsub = services.redis.pubsub()
    await pubsub.subscribe(channel(task_id))
    try:
        task = await services.store.get(task_id)
        if task is None:
            return
        yield task
        seen = task.version
        while not task.status.is_final:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=QUIET_SECONDS)
            if message is None:
                latest = await services.store.get(task_id)
                if latest is None:
                    return
            else:
                latest = Task.from_hash(orjson.loads(message["data"]))
            if latest.version <= seen:
                continue
            task, seen = latest, latest.version
            yield task
    finally:
        await pubsub.unsubscribe()
        await pubsub.aclose()
