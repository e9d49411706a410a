-- A waiting job's place in arq's fair queue (tasks/queue.py explains the design): a function that
-- tasks/queue.py puts before queue.lua (its 'position' entry point) and tasks/reads.py before the
-- polled read of a task, so that a read answers queuePosition in its own round trip.
--
-- queue: the queue's key; id: the job id; now: the time in ms and ceiling: CEILING (both as text);
-- prefix: arq's in-progress key prefix; counted: the job id prefixes that count (space separated:
-- exports and imports, not notifications or cron jobs, which take moments).
-- 1 for the next job to start; nil when the job is not waiting (gone, or running). The jobs ahead
-- are the waiting ones a worker takes first: those of a lower score, and for a tagged job also
-- every due job of arq's own scores (workers take those first); for a due job of arq's own scores,
-- only those of its kind ahead of it.
local function queue_position(queue, id, now_text, ceiling_text, prefix, counted_text)
  local now, ceiling = tonumber(now_text), tonumber(ceiling_text)
  local score = tonumber(redis.call('ZSCORE', queue, id) or '')
  if not score or redis.call('EXISTS', prefix .. id) == 1 then return nil end
  local ahead
  if score < ceiling then
    local rank = redis.call('ZRANK', queue, id)
    ahead = rank > 0 and redis.call('ZRANGE', queue, 0, rank - 1) or {}
    for _, due in ipairs(redis.call('ZRANGEBYSCORE', queue, ceiling_text, now_text)) do ahead[#ahead + 1] = due end
  elseif score <= now then
    ahead = redis.call('ZRANGEBYSCORE', queue, ceiling_text, '(' .. string.format('%d', score))
  else
    ahead = redis.call('ZRANGEBYSCORE', queue, '-inf', '(' .. string.format('%d', score))
  end
  local counted = {}
  for p in string.gmatch(counted_text, '%S+') do counted[#counted + 1] = p end
  local waiting = 1
  for _, other in ipairs(ahead) do
    local kind_counts = false
    for _, p in ipairs(counted) do
      if string.sub(other, 1, #p) == p then kind_counts = true end
    end
    if kind_counts and redis.call('EXISTS', prefix .. other) == 0 then waiting = waiting + 1 end
  end
  return waiting
end
