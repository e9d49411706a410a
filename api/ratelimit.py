"""Sliding-window rate limits kept in Redis, so that every api process counts the same requests.

Each identity has a sorted set of its recent request times; a request is allowed while fewer than
the limit fall in the last minute. Unlike a fixed window, a burst cannot double up across a
minute boundary, and the wait it reports is exact. Check and count are one script, so two api
processes cannot both let the last request through.
"""

from __future__ import annotations

import math
import time
import uuid

from redis.asyncio import Redis

WINDOW_SECONDS = 60

# KEYS: the identity's request log. ARGV: now, window, limit, member.
# Returns nil when allowed (and counted), else the time of the oldest request in the window.
_SLIDING_WINDOW = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]) + 1)
return nil
"""


async def retry_after(redis: Redis, scope: str, identity: str, per_minute: int) -> int | None:
    """Count one request of ``identity``; seconds to wait when it is over the limit, else None.
    A refused request is not counted, so a client that waits as told gets through."""
    now = time.time()
    oldest = await redis.eval(_SLIDING_WINDOW, 1, f"dataport:ratelimit:{scope}:{identity}",
                              f"{now:.6f}", WINDOW_SECONDS, per_minute, f"{now:.6f}:{uuid.uuid4().hex[:8]}")
    if oldest is None:
        return None
    return max(1, math.ceil(float(oldest) + WINDOW_SECONDS - now))
