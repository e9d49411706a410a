"""What every subscription runs inside: a slot of the user's subscription quota, held while it runs,
and an end when the token it was started with expires.

The token's ``exp`` bounds the stream: waiting for the next change never outlasts it, so a quiet
subscription ends at expiry too, with a top-level ``UNAUTHENTICATED`` error (the client signs in
again and resubscribes). The slot is given back however the stream ends.
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
    try:
        while True:
            remaining = credentials.expires_at - time.time()
            if remaining <= 0:
                raise token_expired()
            try:
                item = await asyncio.wait_for(anext(source), remaining)
            except StopAsyncIteration:
                return
            except TimeoutError:  # wait_for cancelled the wait, which closed the source
                raise token_expired() from None
            except RedisError:  # coded, not masked as an internal error (resuming is left to tasks/watch.py)
                raise GraphQLError(
                    "The task store is unavailable; subscribe again shortly.",
                    extensions={"code": errors.SERVICE_UNAVAILABLE},
                ) from None
            yield item
    finally:
        await slot.release()
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
