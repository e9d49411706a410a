"""arq's worker, made to ride out Redis outages, to hold short leases from a job's first instant,
and to shut down without throwing work away.

Three things in arq's own worker turn ordinary production events into stuck or failed tasks:

- Its poll loop lets every Redis error through, so a one-second Redis restart ends every worker
  (``ConnectionError``, or ``WatchError`` when the connection drops inside a ``WATCH``), and their
  jobs wait until a human restarts them. Here a poll that fails on Redis is logged in one line and
  tried again after a growing, jittered pause; the jobs in flight go on by themselves and retry
  their own Redis writes (a job whose bookkeeping failed is run again, fenced by its attempt).
- A started job's in-progress key lives for the whole job timeout (six hours by default) unless
  the job shortens it, so a worker killed before the job's first renewal left its task stuck that
  long. Here the key is set for one lease, and the poll loop renews the leases of every job this
  worker runs, so a dead worker's job is free again within ``worker_lease_seconds`` whatever it was
  doing when it died.
- On SIGTERM it cancelled every running job at once, and the next worker counted the cancelled run
  as a failed try: three rolling deploys failed a good export. Here (with arq's
  ``job_completion_wait``) a stopping worker takes no new job and lets running ones finish for
  ``worker_shutdown_grace_seconds``; a job still running then is handed back to the queue at once
  (arq removes its in-progress key) and its try is given back, so the next worker's run has the
  same attempt number.

The loop also stamps the worker's heartbeat (``workers/heartbeat.py``) for ``/readyz`` and
``dataport_workers``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import arq
import redis.exceptions
from arq.constants import in_progress_key_prefix, retry_key_prefix

from workers.heartbeat import Heartbeat

log = logging.getLogger("dataport.worker")

# What a Redis that is restarting, unreachable or still loading its data looks like to a client.
REDIS_DOWN = (
    redis.exceptions.ConnectionError,  # BusyLoadingError included
    redis.exceptions.TimeoutError,
    redis.exceptions.WatchError,  # redis-py's word for a connection lost inside WATCH
    OSError,
)


class Backoff:
    """Pauses after consecutive failures: doubling from ``first`` up to ``cap``, each with full
    jitter, so that many workers do not all knock on a Redis that has just come back at once."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first = first
        self.cap = cap
        self.failures = 0
        self.since: float | None = None

    def next_delay(self) -> float:
        if self.since is None:
            self.since = time.monotonic()
        self.failures += 1
        return random.uniform(0, min(self.cap, self.first * 2 ** (self.failures - 1)))

    def reset(self) -> float:
        """Seconds the outage lasted; the pauses start small again."""
        lasted = time.monotonic() - self.since if self.since is not None else 0.0
        self.failures, self.since = 0, None
        return lasted


class Worker(arq.Worker):
    def __init__(self, *, lease_seconds: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lease_ms = int(lease_seconds * 1000)
        self.in_progress_timeout_s = lease_seconds  # arq sets the key for this long when it starts a job
        self.heartbeat = Heartbeat(self.queue_name)
        self.outage = Backoff()
        self._renewed_at = 0.0
        self.stopping = False

    def handle_sig_wait_for_completion(self, signum: Any) -> None:
        self.stopping = True
        super().handle_sig_wait_for_completion(signum)

    async def run_job(self, job_id: str, score: int) -> None:
        await super().run_job(job_id, score)
        task = asyncio.current_task()
        if self.stopping and task is not None and task.cancelling():
            # Cut off by the shutdown, not by its own failure: arq leaves it queued for the next
            # worker, and the try it began is not one of the job's tries.
            await self.pool.decr(retry_key_prefix + job_id)
            log.info("handed %s back to the queue: the worker is stopping", job_id)

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
            await self._renew_leases()
            await self.heartbeat.beat(self.pool)
        except REDIS_DOWN as e:
            delay = self.outage.next_delay()
            if self.outage.failures == 1 or self.outage.failures % 20 == 0:
                log.warning(
                    "Redis is unreachable (%s: %s); %d jobs go on, polling again in %.2f s",
                    type(e).__name__,
                    e,
                    len(self.tasks),
                    delay,
                )
            await asyncio.sleep(delay)
            return
        if self.outage.failures:
            failures = self.outage.failures
            log.info("Redis is back after %.1f s (%d failed polls)", self.outage.reset(), failures)

    async def _renew_leases(self) -> None:
        """Every quarter lease, one round trip extends the in-progress key of each running job."""
        now = time.monotonic()
        if now - self._renewed_at < self.lease_ms / 4000:
            return
        running = [job_id for job_id, task in self.tasks.items() if not task.done()]
        if running:
            pipe = self.pool.pipeline(transaction=False)
            for job_id in running:
                pipe.pexpire(in_progress_key_prefix + job_id, self.lease_ms)
            await pipe.execute()
        self._renewed_at = now

    async def close(self) -> None:
        try:
            if self._pool is not None:
                await self.heartbeat.leave(self.pool)
        except REDIS_DOWN:
            pass  # the stamp goes stale by itself
        await super().close()
