"""Open subscriptions per user, counted in Redis so that every api process counts the same ones.

Each subscription holds a slot: a member of the user's sorted set, scored by the time its lease
ends (Redis's clock, so api hosts need not agree on the time). One renewer per api process (per
event loop) renews every slot the process holds, one script call per user's set, all in one
pipeline, every third of a lease (a task per subscription cost memory and a Redis round trip each);
a slot is removed when its subscription ends; the slot of an api process that was killed lapses
with its lease (``subscription_lease_seconds``), so a crash leaks nothing for longer than that.
Taking a slot drops lapsed ones, counts and adds in one script: two api processes cannot both take
the last.

A refusal is ``QUOTA_EXCEEDED``: what is limited is how many are open at once, not how often they
start, so there is no honest retry-after (a slot frees when one of the user's subscriptions ends);
DESIGN.md's ``QUOTA_EXCEEDED`` is the same kind of cap, on active tasks.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref
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

# KEYS: the user's slots. ARGV: lease seconds, then the members to renew. Only slots still held are
# renewed (XX): one released meanwhile stays released.
_RENEW = """
local now = redis.call('TIME')
local ends = tonumber(now[1]) + tonumber(now[2]) / 1e6 + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', ends, ARGV[i])
end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 1)
return 0
"""
# Members per script call: a user with thousands of subscriptions is renewed in a few calls.
_RENEW_BATCH = 500


def slots_key(namespace: str, user: str) -> str:
    return f"dataport:subscriptions:{namespace}:user:{user}"


@dataclass(eq=False)
class SubscriptionSlot:
    redis: Redis
    key: str
    member: str
    lease_seconds: float
    _held: bool = field(default=True, repr=False)

    async def release(self) -> None:
        """Give the slot back (idempotent); if Redis cannot be told, the lease lapses on its own."""
        if not self._held:
            return
        self._held = False
        _renewer().slots.discard(self)
        try:
            await self.redis.zrem(self.key, self.member)
        except Exception as e:
            log.warning("subscription slot: releasing failed, it lapses in %.0f s: %s", self.lease_seconds, e)


class _Renewer:
    """Renews the leases of every slot held in this process (this event loop): one task, started
    with the first slot and ending when none is left, one pipeline per round."""

    def __init__(self) -> None:
        self.slots: set[SubscriptionSlot] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, slot: SubscriptionSlot) -> None:
        self.slots.add(slot)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="subscription-slot-renewer")

    async def _run(self) -> None:
        try:
            while self.slots:
                await asyncio.sleep(min(s.lease_seconds for s in self.slots) / 3)
                try:
                    await self.renew()
                except Exception as e:  # Redis away for a moment: the lease has a margin of two renewals
                    log.warning("subscription slots: renewing the leases failed: %s", e)
        finally:
            self._task = None

    async def renew(self) -> None:
        """Renew every held slot's lease now."""
        groups: dict[tuple[int, str, float], list[SubscriptionSlot]] = {}
        for slot in self.slots:
            groups.setdefault((id(slot.redis), slot.key, slot.lease_seconds), []).append(slot)
        by_client: dict[int, list[list[SubscriptionSlot]]] = {}
        for (client, _, _), group in groups.items():
            by_client.setdefault(client, []).append(group)
        for batches in by_client.values():
            pipe = batches[0][0].redis.pipeline(transaction=False)
            for group in batches:
                first = group[0]
                for i in range(0, len(group), _RENEW_BATCH):
                    members = [s.member for s in group[i : i + _RENEW_BATCH]]
                    pipe.eval(_RENEW, 1, first.key, first.lease_seconds, *members)
            await pipe.execute()


_RENEWERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Renewer] = weakref.WeakKeyDictionary()


def _renewer() -> _Renewer:
    """This event loop's renewer (the api has one loop per process; tests may run several)."""
    loop = asyncio.get_running_loop()
    renewer = _RENEWERS.get(loop)
    if renewer is None:
        renewer = _RENEWERS[loop] = _Renewer()
    return renewer


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
    _renewer().add(slot)
    return slot
