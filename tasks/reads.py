"""A polled task read in one Redis round trip: the task's hash and, when the client asks for
``pollAfterSeconds``, the poll it counts.

A polling client's ``exportTask { … pollAfterSeconds }`` read the hash (``HGETALL``), then counted
the poll (``HINCRBY polls``) from the field's resolver: two round trips one after the other. This
script does both in one step, under the same conditions the resolver counted under (the task
exists, is of the kind asked for, is the caller's or the caller is an admin, and is not finished),
and returns the hash as it was before the count, so ``Task.polls`` is the number of polls before
this one: what ``TaskStore.count_poll`` returned. The task comes back with ``poll_counted`` set, and
``tasks.exports.poll_after_seconds`` then uses it instead of counting again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from redis.asyncio import Redis

from tasks.models import FINAL_STATUSES, Task, TaskKind
from tasks.store import task_key

# KEYS[1] the task; ARGV: kind, owner ("" for an admin: any), final statuses (space-separated).
_READ_COUNTING_POLL = """
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return h end
local kind, owner, status
for i = 1, #h, 2 do
  local name = h[i]
  if name == 'kind' then kind = h[i + 1] elseif name == 'owner' then owner = h[i + 1]
  elseif name == 'status' then status = h[i + 1] end
end
if kind ~= ARGV[1] or (ARGV[2] ~= '' and owner ~= ARGV[2]) then return h end
if string.find(' ' .. ARGV[3] .. ' ', ' ' .. tostring(status) .. ' ', 1, true) then return h end
redis.call('HINCRBY', KEYS[1], 'polls', 1)
h[#h + 1] = '__poll_counted'
h[#h + 1] = '1'
return h
"""
_FINAL = " ".join(sorted(status.value for status in FINAL_STATUSES))
_scripts: dict[int, Any] = {}


def _script(redis: Redis) -> Any:
    script = _scripts.get(id(redis))
    if script is None:
        script = _scripts[id(redis)] = redis.register_script(_READ_COUNTING_POLL)
    return script


async def read_counting_poll(redis: Redis, task_id: str, kind: TaskKind, owner: str | None) -> Task | None:
    """The task (None when missing), its poll counted when it is a ``kind`` task of ``owner`` (or
    any owner's, ``owner`` None: an admin) that has not finished."""
    flat = await _script(redis)(keys=[task_key(task_id)], args=[kind.value, owner or "", _FINAL])
    if not flat:
        return None
    h = dict(zip(flat[0::2], flat[1::2], strict=True))
    counted = h.pop("__poll_counted", None) == "1"
    task = Task.from_hash(h)
    return dataclasses.replace(task, poll_counted=True) if counted else task
