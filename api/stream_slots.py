"""Concurrent streams of the streaming route, counted in Redis so that every api process counts the
same streams.

The per-minute limits of ``api.ratelimit`` bound how often a stream starts, not how many stay open:
a client that stops reading holds its stream, and its source read, for as long as it likes. So each
stream holds a slot: a member of two sorted sets (the user's, and the deployment's), scored by the
time its lease ends. The stream renews the lease while it runs and removes it when it ends; a slot
of an api process that was killed lapses with its lease, so nothing leaks for longer than that.
Taking a slot checks both counts and adds to both in one script: two api processes cannot both
take the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

from redis.asyncio import Redis

log = logging.getLogger("dataport.api")

LEASE_SECONDS = 15.0
RENEW_EVERY_SECONDS = LEASE_SECONDS / 3
# What a refused client is told to wait: streams end when their client has read them, or when it
# has read nothing for the idle timeout, so a slot is usually free again within seconds.
RETRY_AFTER_SECONDS = 5

# KEYS: the user's slots, everyone's. ARGV: now, lease end, per-user limit, overall limit, member, ttl.
# Returns 0 when the slot was taken, 1 when the user has all theirs, 2 when all are taken.
_TAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 1 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return 2 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return 0
"""

# KEYS: as above. ARGV: lease end, member, ttl. Only a slot still held is renewed (XX).
_RENEW = """
redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'XX', ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 0
"""


class NoSlot(Exception):
    """No stream slot is free; ``scope`` is "user" (this user has all theirs) or "all"."""

    def __init__(self, scope: str):
        super().__init__(scope)
        self.scope = scope


@dataclass
class Slot:
    redis: Redis
    keys: tuple[str, str]
    member: str
    _renewer: asyncio.Task | None = field(default=None, repr=False)

    async def _renew_forever(self) -> None:
        ttl = int(LEASE_SECONDS) + 1
        while True:
            await asyncio.sleep(RENEW_EVERY_SECONDS)
            try:
                await self.redis.eval(_RENEW, 2, *self.keys, f"{time.time() + LEASE_SECONDS:.6f}", self.member, ttl)
            except Exception as e:  # Redis away for a moment: the lease has a margin of two renewals
                log.warning("stream slot: renewing the lease failed: %s", e)

    async def release(self) -> None:
        """Give the slot back (idempotent). Shield it: it runs while the response is torn down."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.zrem(self.keys[0], self.member)
                    pipe.zrem(self.keys[1], self.member)
                    await pipe.execute()
            except Exception as e:  # the lease lapses on its own
                log.warning("stream slot: releasing failed, it lapses in %.0f s: %s", LEASE_SECONDS, e)


async def take_slot(redis: Redis, namespace: str, user: str, per_user: int, in_all: int) -> Slot:
    """A stream slot for ``user``, renewed until ``release``; ``NoSlot`` when none is free.
    Redis errors are raised as they are (the caller answers 503)."""
    keys = (f"dataport:streams:{namespace}:user:{user}", f"dataport:streams:{namespace}:all")
    member = uuid.uuid4().hex
    now = time.time()
    taken = await redis.eval(
        _TAKE, 2, *keys, f"{now:.6f}", f"{now + LEASE_SECONDS:.6f}", per_user, in_all, member, int(LEASE_SECONDS) + 1
    )
    if int(taken) == 1:
        raise NoSlot("user")
    if int(taken) == 2:
        raise NoSlot("all")
    slot = Slot(redis, keys, member)
    slot._renewer = asyncio.create_task(slot._renew_forever())
    return slot
