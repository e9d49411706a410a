"""Follow tasks through the process's fan-out (``tasks/fanout.py``): one task (its current snapshot,
then every change, ending after a final status), or every task of one owner.

The inbox is registered *before* the snapshot is read, so no change can fall between the two;
snapshots carry a version, so one seen twice (a re-read after a reconnect, say) or out of order is
dropped. The fan-out already coalesces progress and re-reads quiet and missed tasks, once per
process, so a watcher does no Redis work of its own after its first read. Nor does it wake on a
timer: when Redis has been away too long the hub fails every inbox (``TaskFanout._fail_all``, on
each sweep), which ends a waiting watcher as surely as a periodic check would, at no cost per push.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from tasks.fanout import TaskFanout
from tasks.models import Task

# Writes a progress snapshot to the subscriber itself and says whether it did
# (``api/subscription_push.py``): what it wrote is not yielded.
Push = Callable[[Task], Awaitable[bool]]


async def watch(fanout: TaskFanout, task_id: str, push: Push | None = None) -> AsyncIterator[Task]:
    """The task's snapshot, then each newer one, until a final status (or the task is deleted).
    With ``push``, each snapshot after the first is offered to it and yielded only if it declines."""
    with fanout.task_inbox(task_id) as inbox:
        task = (await fanout.read([task_id])).get(task_id)
        if task is None:
            return
        yield task
        seen = task.version
        while not task.status.is_final:
            fanout.healthy_or_raise()
            taken = await inbox.take()
            if task_id not in taken:
                continue
            latest = taken[task_id]
            if latest is None:  # GONE: deleted
                return
            if latest.version <= seen:
                continue
            task, seen = latest, latest.version
            if push is None or not await push(task):
                yield task


async def watch_owner(fanout: TaskFanout, owner: str, push: Push | None = None) -> AsyncIterator[Task]:
    """The owner's active tasks as they are now, then every change of any of their tasks; endless
    (the subscriber ends it). ``push``: as for ``watch``, per task."""
    seen: dict[str, int] = {}
    with fanout.owner_inbox(owner) as inbox:
        for task in await fanout.active(owner):
            seen[task.id] = task.version
            yield task
        while True:
            fanout.healthy_or_raise()
            for task_id, change in (await inbox.take()).items():
                if change is None or change.version <= seen.get(task_id, -1):
                    continue  # deleted (GONE), or seen already
                seen[task_id] = change.version
                if push is None or not await push(change):
                    yield change
