"""A polled task read in one Redis round trip: the task's hash and, as the client asks for them,
the poll ``pollAfterSeconds`` counts and the task's ``queuePosition``.

A polling client's ``exportTask { … queuePosition pollAfterSeconds }`` read the hash (``HGETALL``),
then counted the poll (``HINCRBY polls``) and ran the queue's position script (which needs the run
number the hash holds), from their fields' resolvers: three round trips one after the other. This
script does all of it in one step. The poll is counted under the same conditions the resolver
counted under (the task exists, is of the kind asked for, is the caller's or the caller is an
admin, and is not finished), and the hash comes back as it was before the count, so ``Task.polls``
is the number of polls before this one: what ``TaskStore.count_poll`` returned. The position is
taken under the same conditions, for a PENDING task only (``tasks.exports.queue_position``), by the
very function the queue's own script runs (``tasks/queue_position.lua``). The task comes back with
``poll_counted`` and ``position_read`` set, and its fields' resolvers use what it carries instead
of asking Redis again.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from tasks import queue
from tasks.models import FINAL_STATUSES, Task, TaskKind
from tasks.store import task_key

# KEYS[1] the task, KEYS[2] the queue. ARGV: kind, owner ("" for an admin: any), final statuses
# (space-separated), "1" to count the poll, "1" to find the queue position, then the position's
# arguments (tasks/queue.py's position_args). The hash, then "__poll_counted" "1" when the poll was
# counted, then "__position" and the position ("" when the job is not waiting) when it was read.
_READ = """
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return h end
local id, kind, owner, status, run
for i = 1, #h, 2 do
  local name = h[i]
  if name == 'kind' then kind = h[i + 1] elseif name == 'owner' then owner = h[i + 1]
  elseif name == 'status' then status = h[i + 1] elseif name == 'id' then id = h[i + 1]
  elseif name == 'run' then run = h[i + 1] end
end
if kind ~= ARGV[1] or (ARGV[2] ~= '' and owner ~= ARGV[2]) then return h end
local n = #h
if ARGV[4] == '1' and not string.find(' ' .. ARGV[3] .. ' ', ' ' .. tostring(status) .. ' ', 1, true) then
  redis.call('HINCRBY', KEYS[1], 'polls', 1)
  h[n + 1] = '__poll_counted'
  h[n + 2] = '1'
  n = n + 2
end
if ARGV[5] == '1' and status == 'PENDING' then
  local job = kind .. ':' .. tostring(id) .. ':' .. string.format('%d', tonumber(run or '') or 1)
  local position = queue_position(KEYS[2], job, ARGV[6], ARGV[7], ARGV[8], ARGV[9])
  h[n + 1] = '__position'
  h[n + 2] = position and tostring(position) or ''
end
return h
"""
_SCRIPT = queue.POSITION_LUA + _READ
_FINAL = " ".join(sorted(status.value for status in FINAL_STATUSES))
_scripts: dict[int, Any] = {}


def _script(redis: Redis) -> Any:
    script = _scripts.get(id(redis))
    if script is None:
        script = _scripts[id(redis)] = redis.register_script(_SCRIPT)
    return script


async def read_task(
    redis: Redis,
    task_id: str,
    kind: TaskKind,
    owner: str | None,
    *,
    count_poll: bool = False,
    queue_name: str | None = None,
) -> Task | None:
    """The task (None when missing). When it is a ``kind`` task of ``owner`` (or of any owner,
    ``owner`` None: an admin): its poll counted if ``count_poll`` and it has not finished, and its
    place in ``queue_name`` read if given and it is PENDING."""
    args: list[object] = [kind.value, owner or "", _FINAL, "1" if count_poll else "", "1" if queue_name else ""]
    if queue_name:
        args += queue.position_args()
    keys = [task_key(task_id), queue_name] if queue_name else [task_key(task_id)]
    flat = await _script(redis)(keys=keys, args=args)
    if not flat:
        return None
    h = dict(zip(flat[0::2], flat[1::2], strict=True))
    counted = h.pop("__poll_counted", None) == "1"
    position = h.pop("__position", None)
    return Task.from_hash(
        h,
        poll_counted=counted,
        position_read=position is not None,
        queue_position=int(position) if position else None,
    )
