-- renew.lua: heartbeat of a running task: extends its lease and its reservations' expiry, and
-- marks the run active. Returns the new expiry (ms), or 0 when the task no longer holds its lease
-- (it expired and was reclaimed, another delivery took it over, or the task was settled).
--
-- KEYS[1]      leases              ZSET  task id -> lease expiry (ms)
-- KEYS[2]      task record         HASH  attempt, state, lease_exp, counted
-- KEYS[3]      run window usage    HASH
-- KEYS[4..6]   reservation expiry  ZSET of the run, day and month windows
--
-- ARGV[1] task id    ARGV[2] attempt    ARGV[3] lease ms    ARGV[4] holder

-- The ARGV described above arrive as one JSON array of strings (one argument to encode
-- instead of dozens); decoding it here keeps every index and comparison unchanged.
local ARGV = cjson.decode(ARGV[1])

local task_id, attempt = ARGV[1], ARGV[2]
if redis.call('HGET', KEYS[2], 'attempt') ~= attempt
    or redis.call('HGET', KEYS[2], 'holder') ~= ARGV[4]
    or redis.call('HGET', KEYS[2], 'state') ~= 'admitted'
    or not redis.call('ZSCORE', KEYS[1], task_id) then
  return 0
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local expiry = now + tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], 'XX', expiry, task_id)
for i = 4, 6 do redis.call('ZADD', KEYS[i], 'XX', expiry, task_id) end
redis.call('HSET', KEYS[2], 'lease_exp', expiry)
redis.call('HSET', KEYS[3], 'last_ms', now)
return expiry
