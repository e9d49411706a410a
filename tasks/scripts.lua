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

-- Statistics for /metrics, kept in the same atomic steps as the statuses they count (README,
-- "Operations"). Per kind:
--   dataport:stats:tasks:{kind}:{status}     sorted set of task ids in that status; score +inf, or
--                                            for EXPIRED the time its hash lapses (its TTL)
--   dataport:stats:duration:{kind}:{status}  hash: 'le:<bound>' counts (not cumulative), sum, count
--                                            of startedAt -> finishedAt, for SUCCEEDED and FAILED
--   dataport:stats:totals:{kind}             hash: rows, bytes of succeeded tasks
-- Sets rather than counters: adding and removing an id is idempotent, so a count never drifts or
-- goes negative, and 'index' can (re)build them while tasks keep moving. The names are built here,
-- not passed in KEYS: Dataport runs on one Redis server, not a cluster.
local STATS = 'dataport:stats:'

-- An integer as Redis writes it ('0' for anything else): no float formatting on the way back.
local function whole(value)
  if type(value) == 'string' and string.match(value, '^%d+$') then return value end
  return '0'
end

local function stats_move(kind, id, from, to, score)
  if not kind or not id then return end
  if from and from ~= to then redis.call('ZREM', STATS .. 'tasks:' .. kind .. ':' .. from, id) end
  if to then redis.call('ZADD', STATS .. 'tasks:' .. kind .. ':' .. to, score or '+inf', id) end
end

-- A task reached SUCCEEDED or FAILED: observe its duration; a success adds its rows and bytes.
local function stats_finished(key, kind, to, buckets)
  local started = tonumber(redis.call('HGET', key, 'started_at') or '')
  local finished = tonumber(redis.call('HGET', key, 'finished_at') or '')
  if started and finished and buckets ~= '' then
    local took = math.max(0, finished - started)
    local hist = STATS .. 'duration:' .. kind .. ':' .. to
    for bound in string.gmatch(buckets, '%S+') do
      if bound == '+Inf' or took <= tonumber(bound) then
        redis.call('HINCRBY', hist, 'le:' .. bound, 1)
        break
      end
    end
    redis.call('HINCRBYFLOAT', hist, 'sum', took)
    redis.call('HINCRBY', hist, 'count', 1)
  end
  if to ~= 'SUCCEEDED' then return end
  local rows, bytes
  if kind == 'export' then
    rows, bytes = redis.call('HGET', key, 'row_count'), redis.call('HGET', key, 'file_size')
  else
    local ok, request = pcall(cjson.decode, redis.call('HGET', key, 'request') or '{}')
    local dry = ok and type(request) == 'table' and request['dryRun'] == true
    rows = dry and '0' or redis.call('HGET', key, 'rows_imported')
    bytes = redis.call('HGET', key, 'bytes')
  end
  local totals = STATS .. 'totals:' .. kind
  redis.call('HINCRBY', totals, 'rows', whole(rows))
  redis.call('HINCRBY', totals, 'bytes', whole(bytes))
end

-- Each owner's active tasks (WAITING_FOR_UPLOAD, PENDING, PROCESSING), for the per-user quota:
--   dataport:active:{owner}   set of task ids, kept by the same steps that change a status
-- The quota is checked against it when a task is created or run again ('request'), so two api
-- processes cannot both create the last task a user may have.
local ACTIVE = 'dataport:active:'
local ACTIVE_STATUSES = {WAITING_FOR_UPLOAD = true, PENDING = true, PROCESSING = true}

local function active_mark(owner, id, status)
  if not owner or not id then return end
  if status and ACTIVE_STATUSES[status] then
    redis.call('SADD', ACTIVE .. owner, id)
  else
    redis.call('SREM', ACTIVE .. owner, id)
  end
end

-- How many active tasks the owner has; ids whose task is gone or finished are dropped first
-- (a repair: every step that ends a task removes its id already).
local function active_count(owner)
  local key = ACTIVE .. owner
  for _, id in ipairs(redis.call('SMEMBERS', key)) do
    local status = redis.call('HGET', 'dataport:task:' .. id, 'status')
    if not (status and ACTIVE_STATUSES[status]) then redis.call('SREM', key, id) end
  end
  return redis.call('SCARD', key)
end

-- The audit record of a step (audit/, docs/audit.md), appended to the queue's audit outbox in the
-- same atomic step as the change it records: no change is ever left without its record, whatever
-- process dies when. The caller passes five ARGV from index i: record id ('' = the audit log is off),
-- action, actor JSON, detail JSON, outbox key. ``extra`` goes into the detail (fields 'x:NAME').
local function audit(i, at, key, extra)
  local record_id = ARGV[i]
  if not record_id or record_id == '' then return end
  local args = {'XADD', ARGV[i + 4], '*', 'id', record_id, 'at', at, 'action', ARGV[i + 1],
                'actor', ARGV[i + 2], 'detail', ARGV[i + 3]}
  local task_id, dataset = redis.call('HGET', key, 'id'), redis.call('HGET', key, 'dataset')
  if task_id then args[#args + 1] = 'task_id'; args[#args + 1] = task_id end
  if dataset then args[#args + 1] = 'dataset'; args[#args + 1] = dataset end
  for name, value in pairs(extra) do
    if value then args[#args + 1] = 'x:' .. name; args[#args + 1] = tostring(value) end
  end
  redis.call(unpack(args))
end

local entry = ARGV[1]

-- KEYS: task, events, history, dataset-written-at, expiry schedule, owner's active set
-- ARGV: 'request', channel, now, reuse_seconds, history_score, max_active ('' = no limit), n,
--       fields... (fields for a new task, 'owner' among them), then the audit record's five
--       (``audit``; its detail gains outcome, run, status and the status it came from)
-- Returns {outcome, run}: outcome is created | existing | rerun, or {'quota', active count} when
-- creating or running again would take the owner past max_active active tasks (nothing written).
if entry == 'request' then
  local channel, now, reuse, score = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
  local max_active = ARGV[6]
  local fields = list_from(8, tonumber(ARGV[7]))
  local audit_at = 8 + tonumber(ARGV[7])
  local status = redis.call('HGET', KEYS[1], 'status')
  local reused = status == 'PENDING' or status == 'PROCESSING' or status == 'WAITING_FOR_UPLOAD'
  if status == 'SUCCEEDED' then
    local finished = tonumber(redis.call('HGET', KEYS[1], 'finished_at') or '0')
    local written = tonumber(redis.call('GET', KEYS[4]) or '0')
    reused = finished + reuse > now and written < finished
  end
  if reused then
    local run = redis.call('HGET', KEYS[1], 'run')
    audit(audit_at, ARGV[3], KEYS[1], {outcome = 'existing', run = run, status = status})
    return {'existing', run}
  end
  local owner = nil
  for i = 1, #fields, 2 do
    if fields[i] == 'owner' then owner = fields[i + 1] end
  end
  if max_active ~= '' and owner then
    local active = active_count(owner)
    if active >= tonumber(max_active) then return {'quota', tostring(active)} end
  end
  local outcome, run = 'created', 1
  local old_kind = redis.call('HGET', KEYS[1], 'kind')
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
  if status and old_kind then stats_move(old_kind, redis.call('HGET', KEYS[1], 'id'), status, nil) end
  stats_move(redis.call('HGET', KEYS[1], 'kind'), redis.call('HGET', KEYS[1], 'id'), nil, status_now)
  active_mark(redis.call('HGET', KEYS[1], 'owner'), redis.call('HGET', KEYS[1], 'id'), status_now)
  local message = outcome == 'rerun' and ('requested again: run ' .. run) or 'requested'
  event(KEYS[2], ARGV[3], status_now, message)
  audit(audit_at, ARGV[3], KEYS[1], {outcome = outcome, run = run, status = status_now, from = status})
  publish(KEYS[1], channel)
  return {outcome, tostring(run)}
end

-- KEYS: task, events, expiry schedule
-- ARGV: 'transition', channel, now, to, allowed_from (space separated), fence_attempt ('' = none),
--       message, expire_at ('' = not scheduled), lapse_seconds ('' = kept), duration buckets
--       (space separated upper bounds, the last '+Inf'), n, fields..., then the audit record's five
--       (``audit``; its detail gains from, to, reason, run and attempt)
-- lapse_seconds: the task and its events are deleted that long after this transition (EXPIRED),
-- and it leaves the expiry schedule.
-- Returns {'ok', status} or {'conflict', current status} or {'missing', ''}.
if entry == 'transition' then
  local channel, now, to, allowed, fence, message = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
  local expire_at, lapse, buckets = ARGV[8], ARGV[9], ARGV[10]
  local fields = list_from(12, tonumber(ARGV[11]))
  local audit_at = 12 + tonumber(ARGV[11])
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
  local id, kind = redis.call('HGET', KEYS[1], 'id'), redis.call('HGET', KEYS[1], 'kind')
  if expire_at ~= '' then
    redis.call('HSET', KEYS[1], 'expires_at', expire_at)
    redis.call('ZADD', KEYS[3], expire_at, id)
  end
  event(KEYS[2], now, to, message)
  audit(audit_at, now, KEYS[1], {from = status, to = to, reason = message,
                                 run = redis.call('HGET', KEYS[1], 'run'),
                                 attempt = redis.call('HGET', KEYS[1], 'attempts')})
  if lapse ~= '' then
    redis.call('ZREM', KEYS[3], id)
    redis.call('EXPIRE', KEYS[1], lapse)
    redis.call('EXPIRE', KEYS[2], lapse)
  end
  local lapses_at = nil
  if lapse ~= '' then lapses_at = tostring(tonumber(now) + tonumber(lapse)) end
  stats_move(kind, id, status, to, lapses_at)
  active_mark(redis.call('HGET', KEYS[1], 'owner'), id, to)
  if kind and to == 'EXPIRED' then  -- forget the ids whose hashes have lapsed meanwhile
    redis.call('ZREMRANGEBYSCORE', STATS .. 'tasks:' .. kind .. ':EXPIRED', '-inf', '(' .. now)
  end
  if kind and (to == 'SUCCEEDED' or to == 'FAILED') and status ~= to then
    stats_finished(KEYS[1], kind, to, buckets)
  end
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

-- KEYS: task, events, history, expiry schedule
-- ARGV: 'delete', id, now, then the audit record's five (see ``audit``)
-- The task, its events and its places in the history, the expiry schedule and the statistics.
if entry == 'delete' then
  local kind, status = redis.call('HGET', KEYS[1], 'kind'), redis.call('HGET', KEYS[1], 'status')
  if status then audit(4, ARGV[3], KEYS[1], {status = status}) end
  stats_move(kind, ARGV[2], status, nil)
  active_mark(redis.call('HGET', KEYS[1], 'owner'), ARGV[2], nil)
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
  redis.call('ZREM', KEYS[4], ARGV[2])
  return 1
end

-- KEYS: task
-- ARGV: 'index', id, now, kinds (space separated), statuses (space separated)
-- Puts one task in the statistics set of its status and takes it out of every other: the
-- back-fill for tasks written before the statistics existed, and a repair; the owner's active set
-- too. Idempotent.
if entry == 'index' then
  local id, now = ARGV[2], tonumber(ARGV[3])
  local kind, status = redis.call('HGET', KEYS[1], 'kind'), redis.call('HGET', KEYS[1], 'status')
  for k in string.gmatch(ARGV[4], '%S+') do
    for s in string.gmatch(ARGV[5], '%S+') do
      if k ~= kind or s ~= status then redis.call('ZREM', STATS .. 'tasks:' .. k .. ':' .. s, id) end
    end
  end
  if not kind or not status then return 0 end
  active_mark(redis.call('HGET', KEYS[1], 'owner'), id, status)
  local score = '+inf'
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then score = tostring(now + ttl / 1000) end
  redis.call('ZADD', STATS .. 'tasks:' .. kind .. ':' .. status, score, id)
  return 1
end

-- KEYS: owner's active set
-- ARGV: 'active', owner
-- The owner's active tasks, counted as the quota counts them.
if entry == 'active' then
  return active_count(ARGV[2])
end

return redis.error_reply('unknown entry point ' .. tostring(entry))
