-- Dataport task scripts. Each entry point checks, writes, records an event and publishes the new
-- snapshot in one atomic step, so no reader ever sees a write without its event or snapshot, and
-- a late write can never revive a task that has moved on.
--
-- Loaded as a Redis function-less script: the first ARGV is the entry point's name.

local function snapshot(key)
  local flat = redis.call('HGETALL', key)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end

local function publish(key, channel)
  redis.call('PUBLISH', channel, cjson.encode(snapshot(key)))
end

local function event(stream, at, status, message)
  redis.call('XADD', stream, 'MAXLEN', '~', 1000, '*', 'at', at, 'status', status, 'message', message)
end

-- Apply a flat list of field/value pairs; an empty value deletes the field.
local function apply(key, fields)
  for i = 1, #fields, 2 do
    if fields[i + 1] == '' then
      redis.call('HDEL', key, fields[i])
    else
      redis.call('HSET', key, fields[i], fields[i + 1])
    end
  end
  redis.call('HINCRBY', key, 'version', 1)
end

local function list_from(i, n)
  local out = {}
  for j = i, i + n - 1 do out[#out + 1] = ARGV[j] end
  return out
end

local entry = ARGV[1]

-- KEYS: task, events, history, dataset-written-at, expiry schedule
-- ARGV: 'request', channel, now, reuse_seconds, history_score, n, fields... (fields for a new task)
-- Returns {outcome, run}: outcome is created | existing | rerun.
if entry == 'request' then
  local channel, now, reuse, score = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
  local fields = list_from(7, tonumber(ARGV[6]))
  local status = redis.call('HGET', KEYS[1], 'status')
  if status == 'PENDING' or status == 'PROCESSING' or status == 'WAITING_FOR_UPLOAD' then
    return {'existing', redis.call('HGET', KEYS[1], 'run')}
  end
  if status == 'SUCCEEDED' then
    local finished = tonumber(redis.call('HGET', KEYS[1], 'finished_at') or '0')
    local written = tonumber(redis.call('GET', KEYS[4]) or '0')
    if finished + reuse > now and written < finished then
      return {'existing', redis.call('HGET', KEYS[1], 'run')}
    end
  end
  local outcome, run = 'created', 1
  if status then
    outcome = 'rerun'
    run = tonumber(redis.call('HGET', KEYS[1], 'run') or '1') + 1
    -- A new run starts clean: nothing of the previous run's progress, result or error remains,
    -- and createdAt is this run's request. Only the version keeps counting, for subscribers.
    -- The previous run's retention clock stops too.
    local version = redis.call('HGET', KEYS[1], 'version')
    redis.call('ZREM', KEYS[5], redis.call('HGET', KEYS[1], 'id'))
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], 'version', version)
  end
  apply(KEYS[1], fields)
  redis.call('HSET', KEYS[1], 'run', run)
  redis.call('ZADD', KEYS[3], score, redis.call('HGET', KEYS[1], 'id'))
  local status_now = redis.call('HGET', KEYS[1], 'status')
  local message = outcome == 'rerun' and ('requested again: run ' .. run) or 'requested'
  event(KEYS[2], ARGV[3], status_now, message)
  publish(KEYS[1], channel)
  return {outcome, tostring(run)}
end

-- KEYS: task, events, expiry schedule
-- ARGV: 'transition', channel, now, to, allowed_from (space separated), fence_attempt ('' = none),
--       message, expire_at ('' = not scheduled), n, fields...
-- Returns {'ok', status} or {'conflict', current status} or {'missing', ''}.
if entry == 'transition' then
  local channel, now, to, allowed, fence, message = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
  local expire_at = ARGV[8]
  local fields = list_from(10, tonumber(ARGV[9]))
  local status = redis.call('HGET', KEYS[1], 'status')
  if not status then return {'missing', ''} end
  if not string.find(' ' .. allowed .. ' ', ' ' .. status .. ' ', 1, true) then
    return {'conflict', status}
  end
  if fence ~= '' and redis.call('HGET', KEYS[1], 'attempts') ~= fence then
    return {'conflict', status}
  end
  apply(KEYS[1], fields)
  redis.call('HSET', KEYS[1], 'status', to)
  if expire_at ~= '' then
    redis.call('HSET', KEYS[1], 'expires_at', expire_at)
    redis.call('ZADD', KEYS[3], expire_at, redis.call('HGET', KEYS[1], 'id'))
  end
  event(KEYS[2], now, to, message)
  publish(KEYS[1], channel)
  return {'ok', to}
end

-- KEYS: task
-- ARGV: 'progress', channel, attempt, n, fields...
-- Written only while the task is PROCESSING in this very attempt. Returns 1 if written, else 0:
-- the worker reads 0 as "stop, this task has moved on" (cancelled, deleted, claimed again).
if entry == 'progress' then
  local channel, attempt = ARGV[2], ARGV[3]
  local fields = list_from(5, tonumber(ARGV[4]))
  if redis.call('HGET', KEYS[1], 'status') ~= 'PROCESSING' then return 0 end
  if redis.call('HGET', KEYS[1], 'attempts') ~= attempt then return 0 end
  apply(KEYS[1], fields)
  publish(KEYS[1], channel)
  return 1
end

return redis.error_reply('unknown entry point ' .. tostring(entry))
