-- Fair queueing on arq's queue (tasks/queue.py explains the design). Scripts, so that choosing a
-- job's place and writing it is one atomic step however many api processes enqueue at once.
--
-- arq starts the jobs whose score is <= now in ascending score. An export or import job gets a
-- score far in the past that encodes a start tag ("round") and its arrival:
--   score = 1 + tag * TIE + (arrival % TIE)        always below CEILING (2^40 ms, in 2004)
-- Jobs arq scores itself (notifications, cron, a retry after its pause) are at now or later, at or
-- above CEILING; workers take those that are due first (workers/fair.py).
--
-- State, beside the queue's sorted set:
--   {queue}:fair              hash: vtime (the largest tag a worker has started), seq (arrivals)
--   {queue}:fair:last:{owner} the tag after the owner's last job (its next job goes no earlier)
--
-- The first ARGV names the entry point. tasks/queue.py puts tasks/queue_position.lua before this file.

local entry = ARGV[1]

-- KEYS: queue, job, job result, fair state, owner's last tag
-- ARGV: 'enqueue', job id, serialized job, job expiry (ms), TIE, owner key lifetime (ms)
-- Writes the job as arq's enqueue_job does (unless it exists or has a result, as arq would refuse)
-- with tag = max(vtime, owner's last); returns the score, or false when the job was there already.
if entry == 'enqueue' then
  if redis.call('EXISTS', KEYS[2], KEYS[3]) > 0 then return false end
  local tie = tonumber(ARGV[5])
  local vtime = tonumber(redis.call('HGET', KEYS[4], 'vtime') or '0')
  local last = tonumber(redis.call('GET', KEYS[5]) or '0')
  local tag = math.max(vtime, last)
  redis.call('SET', KEYS[5], string.format('%d', tag + 1), 'PX', ARGV[6])
  local seq = redis.call('HINCRBY', KEYS[4], 'seq', 1) % tie
  local score = string.format('%d', 1 + tag * tie + seq)
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
  redis.call('ZADD', KEYS[1], score, ARGV[2])
  return score
end

-- KEYS: queue, fair state
-- ARGV: 'started', job id, TIE, CEILING
-- A worker started the job: the virtual time moves up to its tag (never down: a job run again after
-- its worker died keeps its old, earlier tag). Returns the virtual time.
if entry == 'started' then
  local score = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[2]) or '')
  local vtime = tonumber(redis.call('HGET', KEYS[2], 'vtime') or '0')
  if score and score < tonumber(ARGV[4]) then
    local tag = math.floor((score - 1) / tonumber(ARGV[3]))
    if tag > vtime then
      vtime = tag
      redis.call('HSET', KEYS[2], 'vtime', string.format('%d', vtime))
    end
  end
  return string.format('%d', vtime)
end

-- KEYS: queue
-- ARGV: 'position', job id, now (ms), CEILING, in-progress key prefix, counted job id prefixes
-- queue_position (tasks/queue_position.lua, put before this file): 1 for the next job to start; nil
-- when the job is not waiting.
if entry == 'position' then
  return queue_position(KEYS[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
end

return redis.error_reply('unknown entry point ' .. tostring(entry))
