"""What every subscription runs inside: a slot of the user's subscription quota, held while it runs,
and an end when the token it was started with expires.

The token's ``exp`` bounds the stream: waiting for the next change never outlasts it, so a quiet
subscription ends at expiry too, with a top-level ``UNAUTHENTICATED`` error (the client signs in
again and resubscribes). The slot is given back however the stream ends.

The expiry is one timer per subscription, not a timeout around every wait: at the token's expiry it
cancels the subscription's task if, and only if, the task is waiting here for the next item (what
``asyncio.timeout`` does, without its object, timer and loop look-ups on every push: a tenth of the
api's CPU per push with 1,000 subscribers, bench/subscribers.py); otherwise the next round finds
the token expired.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

from graphql import GraphQLError
from redis.exceptions import RedisError

from api.context import Info
from api.subscription_slots import take_slot
from dataport import errors

T = TypeVar("T")


def token_expired() -> GraphQLError:
    return GraphQLError(
        "The token has expired; sign in again and resubscribe.", extensions={"code": errors.UNAUTHENTICATED}
    )


class _Expiry:
    """The token's expiry, as a timer's callback: cancels the subscription's task only while it
    waits for the next item (``waiting``); ``has_fired`` tells the loop, and the cancellation, why."""

    __slots__ = ("task", "waiting", "fired")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.waiting = False
        self.fired = False

    def fire(self) -> None:
        self.fired = True
        if self.waiting:
            self.task.cancel()

    def has_fired(self) -> bool:
        """``fired``, read through a call: it changes while the subscription awaits."""
        return self.fired


async def guarded(info: Info, source: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    context = info.context
    settings = context.services.settings
    credentials = context.credentials
    slot = await take_slot(
        context.services.redis,
        settings.queue_name,
        credentials.owner.id,
        settings.max_subscriptions_per_user,
        settings.subscription_lease_seconds,
    )
    task = asyncio.current_task()
    assert task is not None, "a subscription runs in its operation's task"
    expiry = _Expiry(task)
    timer = asyncio.get_running_loop().call_later(max(0.0, credentials.expires_at - time.time()), expiry.fire)
    try:
        while True:
            if expiry.has_fired() or credentials.expires_at <= time.time():
                raise token_expired()
            expiry.waiting = True
            try:
                item = await anext(source)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                # Ours (the expiry), unless the client ended the subscription too: then theirs wins.
                if expiry.has_fired() and task.uncancel() == 0:
                    raise token_expired() from None  # the cancellation closed the source
                raise
            except RedisError:  # coded, not masked as an internal error (resuming is left to tasks/watch.py)
                raise GraphQLError(
                    "The task store is unavailable; subscribe again shortly.",
                    extensions={"code": errors.SERVICE_UNAVAILABLE},
                ) from None
            finally:
                expiry.waiting = False
            yield item
    finally:
        timer.cancel()
        await slot.release()
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
