"""One subscriber's mailbox in the task fan-out (``tasks/fanout.py``): the newest snapshot of each
task it follows, never a backlog.

The hub offers snapshots synchronously and never waits for a subscriber. A subscriber that reads
slowly (its WebSocket is stalled) finds, when it reads again, only the newest snapshot of each task
(older versions are replaced in place), so its memory is bounded by the tasks it follows and the
others never wait for it.
"""

from __future__ import annotations

import asyncio

from tasks.models import Task

# What ``take`` returns for a task that was deleted: its id with no snapshot.
GONE = None


class Inbox:
    __slots__ = ("_latest", "_ready", "_error")

    def __init__(self) -> None:
        self._latest: dict[str, Task | None] = {}
        self._ready = asyncio.Event()
        self._error: BaseException | None = None

    def offer(self, task: Task) -> None:
        """Keep ``task`` if it is newer than the snapshot of it held now (by version)."""
        held = self._latest.get(task.id)
        if held is None or task.version > held.version:
            self._latest[task.id] = task
            self._ready.set()

    def offer_gone(self, task_id: str) -> None:
        """The task was deleted: its watchers end."""
        self._latest[task_id] = GONE
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        """End the subscriber with ``error`` at its next ``take``."""
        self._error = error
        self._ready.set()

    async def take(self, within: float | None = None) -> dict[str, Task | None]:
        """Wait for snapshots (at most ``within`` seconds; then ``{}``) and take all held, oldest
        offered first. Raises the error given to ``fail``."""
        if not self._ready.is_set():
            if within is None:
                await self._ready.wait()
            else:
                try:
                    await asyncio.wait_for(self._ready.wait(), within)
                except TimeoutError:
                    return {}
        if self._error is not None:
            raise self._error
        taken, self._latest = self._latest, {}
        self._ready.clear()
        return taken

    def __len__(self) -> int:
        return len(self._latest)
