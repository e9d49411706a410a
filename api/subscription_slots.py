"""Open subscriptions per user, counted in Redis so that every api process counts the same ones.

Each subscription holds a slot: a member of the user's sorted set, scored by the time its lease
ends (Redis's clock, so api hosts need not agree on the time). The subscription renews its lease
while it runs and removes it when it ends; the slot of an api process that was killed lapses with
its lease (``subscription_lease_seconds``), so a crash leaks nothing for longer than that. Taking a
slot drops lapsed ones, counts and adds in one script: two api processes cannot both take the last.

A refusal is ``QUOTA_EXCEEDED``: what is limited is how many are open at once, not how often they
start, so there is no honest retry-after (a slot frees when one of the user's subscriptions ends);
DESIGN.md's ``QUOTA_EXCEEDED`` is the same kind of cap, on active tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field

from graphql import GraphQLError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from dataport import errors

log = logging.getLogger("dataport.api")

# KEYS: the user's slots. ARGV: lease seconds, limit, member. 1 when taken, 0 when all are in use.
_TAKE = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 1)
return 1
"""

# KEYS: the user's slots. ARGV: lease seconds, member. Only a slot still held is renewed (XX).
_RENEW = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 1)
return 0
"""


def slots_key(namespace: str, user: str) -> str:
    return f"dataport:subscriptions:{namespace}:user:{user}"


@dataclass
class SubscriptionSlot:
    redis: Redis
    key: str
    member: str
    lease_seconds: float
    _renewer: asyncio.Task | None = field(default=None, repr=False)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self.redis.eval(_RENEW, 1, self.key, self.lease_seconds, self.member)
            except Exception as e:  # Redis away for a moment: the lease has a margin of two renewals
                log.warning("subscription slot: renewing the lease failed: %s", e)

    async def release(self) -> None:
        """Give the slot back (idempotent); if Redis cannot be told, the lease lapses on its own."""
        if self._renewer is None:
            return
        self._renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._renewer
        self._renewer = None
        try:
            await self.redis.zrem(self.key, self.member)
        except Exception as e:
            log.warning("subscription slot: releasing failed, it lapses in %.0f s: %s", self.lease_seconds, e)


async def take_slot(redis: Redis, namespace: str, user: str, limit: int, lease_seconds: float) -> SubscriptionSlot:
    """A slot for one more subscription of ``user``, renewed until ``release``; a ``QUOTA_EXCEEDED``
    ``GraphQLError`` when the user has ``limit`` open already."""
    key = slots_key(namespace, user)
    member = uuid.uuid4().hex
    try:
        taken = int(await redis.eval(_TAKE, 1, key, lease_seconds, limit, member))
    except RedisError:
        raise GraphQLError(
            "The task store is unavailable; try again shortly.", extensions={"code": errors.SERVICE_UNAVAILABLE}
        ) from None
    if not taken:
        raise GraphQLError(
            f"You have {limit} subscriptions open, the most allowed; end one before starting another.",
            extensions={"code": errors.QUOTA_EXCEEDED, "limit": limit},
        )
    slot = SubscriptionSlot(redis, key, member, lease_seconds)
    slot._renewer = asyncio.create_task(slot._renew_forever())
    return slot
