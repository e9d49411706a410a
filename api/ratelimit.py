"""Sliding-window rate limits kept in Redis, so that every api process counts the same requests.

Each identity has a sorted set of its recent request times; a request is allowed while fewer than
the limit fall in the last minute (or the window given). Unlike a fixed window, a burst cannot
double up across a window boundary, and the wait it reports is exact. Check and count are one
script, so two api processes cannot both let the last request through; ``retry_after_all`` checks
several identities (a user and an address) in one step and counts the request against all of them
or none.
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
    oldest = await redis.eval(
        _SLIDING_WINDOW,
        1,
        f"dataport:ratelimit:{scope}:{identity}",
        f"{now:.6f}",
        WINDOW_SECONDS,
        per_minute,
        f"{now:.6f}:{uuid.uuid4().hex[:8]}",
    )
    if oldest is None:
        return None
    return max(1, math.ceil(float(oldest) + WINDOW_SECONDS - now))


# KEYS: the request logs of every identity. ARGV: now, window, member, then one limit per key,
# then (optional) an audit outbox and the field/value pairs of the record of a refusal, which is
# appended in the same step (docs/audit.md): a refused request costs no extra round trip.
# Returns nil when allowed (counted in every log), else the seconds until each log that is full
# lets one more in, the longest of them (as a string: a fraction).
_SLIDING_WINDOWS = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local wait = nil
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZCARD', key) >= tonumber(ARGV[3 + i]) then
    local oldest = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2])
    wait = math.max(wait or 0, oldest + window - now)
  end
end
local audit = 4 + #KEYS
if wait and ARGV[audit] then
  local args = {'XADD', ARGV[audit], '*'}
  for j = audit + 1, #ARGV do args[#args + 1] = ARGV[j] end
  args[#args + 1] = 'x:retry_after_seconds'
  args[#args + 1] = tostring(math.max(1, math.ceil(wait)))
  redis.call(unpack(args))
end
if wait then return tostring(wait) end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, ARGV[1], ARGV[3])
  redis.call('PEXPIRE', key, math.ceil(window * 1000) + 1000)
end
return nil
"""


async def retry_after_all(
    redis: Redis,
    checks: list[tuple[str, str, int]],
    window_seconds: float,
    refusal: tuple[str, dict[str, str]] | None = None,
) -> int | None:
    """Count one request against every ``(scope, identity, limit)``, or against none of them when
    any is over its limit; then the whole seconds to wait, after which the request gets through
    (if nothing else was counted meanwhile). ``refusal``: an audit outbox and the record appended
    to it, in the same step, when the request is refused."""
    extra: list[str] = []
    if refusal is not None:
        extra = [refusal[0], *(part for pair in refusal[1].items() for part in pair)]
    now = time.time()
    keys = [f"dataport:ratelimit:{scope}:{identity}" for scope, identity, _ in checks]
    wait = await redis.eval(
        _SLIDING_WINDOWS,
        len(keys),
        *keys,
        f"{now:.6f}",
        window_seconds,
        f"{now:.6f}:{uuid.uuid4().hex[:8]}",
        *(limit for _, _, limit in checks),
        *extra,
    )
    if wait is None:
        return None
    return max(1, math.ceil(float(wait) - (time.time() - now)))
