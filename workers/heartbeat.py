"""Which workers are alive: each worker stamps itself into one Redis sorted set per queue.

arq's own health-check key is one key per queue, overwritten by whichever worker wrote last, so it
cannot say how many workers there are, nor notice that all of them have gone. Here every worker
writes ``{host}:{pid}`` with the time, at most once a second, from its poll loop; a worker counts
as alive while its stamp is younger than ``STALE_SECONDS``. ``/readyz`` and ``dataport_workers``
read the set, and readers drop the stale members they meet, so a killed worker leaves nothing.
"""

from __future__ import annotations

import os
import socket
import time

from redis.asyncio import Redis

STALE_SECONDS = 15.0
INTERVAL_SECONDS = 1.0


def workers_key(queue_name: str) -> str:
    return f"dataport:workers:{queue_name}"


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    """One worker's stamp, written at most every ``INTERVAL_SECONDS``."""

    def __init__(self, queue_name: str) -> None:
        self.key = workers_key(queue_name)
        self.name = worker_name()
        self._last = 0.0

    async def beat(self, redis: Redis) -> None:
        now = time.time()
        if now - self._last < INTERVAL_SECONDS:
            return
        await redis.zadd(self.key, {self.name: now})
        self._last = now

    async def leave(self, redis: Redis) -> None:
        await redis.zrem(self.key, self.name)


async def live_workers(redis: Redis, queue_name: str) -> int:
    """Workers on ``queue_name`` that stamped themselves within ``STALE_SECONDS``."""
    key = workers_key(queue_name)
    now = time.time()
    pipe = redis.pipeline(transaction=False)
    pipe.zremrangebyscore(key, "-inf", now - STALE_SECONDS)
    pipe.zcount(key, now - STALE_SECONDS, "+inf")
    _, alive = await pipe.execute()
    return int(alive)
