"""Progress as a running job reports it: throttled, and the channel back that says "stop"."""

from __future__ import annotations

import time

from tasks.store import TaskStore


class TaskMovedOn(Exception):
    """The task is no longer this attempt's to run: cancelled, deleted, or claimed again."""


class ProgressReporter:
    def __init__(
        self,
        store: TaskStore,
        task_id: str,
        attempt: int,
        total_rows: int | None,
        interval: float,
        *,
        total_bytes: int | None = None,
    ):
        self.store = store
        self.task_id = task_id
        self.attempt = attempt
        self.total_rows = total_rows
        # Imports know their file's size, not their row count: their ETA comes from bytes.
        self.total_bytes = total_bytes
        self.interval = interval
        self.rows = 0
        self.bytes = 0
        self.counters: dict[str, int] = {}  # more fields written with each update (rows_failed, …)
        self._started = time.monotonic()
        self._last_write = 0.0

    async def advance(self, rows: int, size: int) -> None:
        """Count a batch; write at most every ``interval`` seconds. Raises ``TaskMovedOn``."""
        self.rows += rows
        self.bytes += size
        if time.monotonic() - self._last_write >= self.interval:
            await self.flush()

    async def flush(self) -> None:
        self._last_write = time.monotonic()
        elapsed = max(self._last_write - self._started, 1e-6)
        rate = self.rows / elapsed
        eta = None
        if self.total_bytes is not None and self.bytes > 0:
            eta = max(0.0, (self.total_bytes - self.bytes) * elapsed / self.bytes)
        elif self.total_rows is not None and rate > 0:
            eta = max(0.0, (self.total_rows - self.rows) / rate)
        written = await self.store.progress(
            self.task_id,
            self.attempt,
            {
                "processed_rows": self.rows,
                "total_rows": self.total_rows,
                "bytes": self.bytes,
                "rows_per_second": round(rate, 1),
                "eta_seconds": None if eta is None else round(eta, 2),
                **self.counters,
            },
        )
        if not written:
            raise TaskMovedOn(self.task_id)
