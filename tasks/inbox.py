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
    """The newest snapshot per task, and one waiter to wake: a bare future rather than an
    ``asyncio.Event``, whose every wait looks the running loop up (a ``getpid()`` syscall in 3.11),
    once per push per subscriber."""

    __slots__ = ("_latest", "_ready", "_waiter", "_error", "_loop")

    def __init__(self) -> None:
        self._latest: dict[str, Task | None] = {}
        self._ready = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # found at the first wait

    def _wake(self) -> None:
        self._ready = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def offer(self, task: Task) -> None:
        """Keep ``task`` if it is newer than the snapshot of it held now (by version)."""
        held = self._latest.get(task.id)
        if held is None or task.version > held.version:
            self._latest[task.id] = task
            self._wake()

    def offer_gone(self, task_id: str) -> None:
        """The task was deleted: its watchers end."""
        self._latest[task_id] = GONE
        self._wake()

    def fail(self, error: BaseException) -> None:
        """End the subscriber with ``error`` at its next ``take``."""
        self._error = error
        self._wake()

    async def take(self, within: float | None = None) -> dict[str, Task | None]:
        """Wait for snapshots (at most ``within`` seconds; then ``{}``) and take all held, oldest
        offered first. Raises the error given to ``fail``."""
        if not self._ready:
            if within is not None and within <= 0:
                return {}
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._waiter = self._loop.create_future()
            try:
                if within is None:
                    await self._waiter
                else:
                    async with asyncio.timeout(within):
                        await self._waiter
            except TimeoutError:
                return {}
            finally:
                self._waiter = None
        if self._error is not None:
            raise self._error
        taken, self._latest = self._latest, {}
        self._ready = False
        return taken

    def __len__(self) -> int:
        return len(self._latest)
