-- renew.lua: heartbeat of a running task: extends its lease (which its reservation follows) and
-- the time the reconciler looks at it again, and marks the run active. Returns the new expiry
-- (ms), or 0 when the task no longer holds its lease (it expired and was reclaimed, another
-- delivery took it over, or the attempt was settled).
--
-- KEYS[1]      leases              ZSET  record key -> lease expiry (ms)
-- KEYS[2]      ledger              ZSET  record key -> when to look at it again (ms)
-- KEYS[3]      task record         HASH
-- KEYS[4]      run window usage    HASH
--
-- ARGV (vocabulary.RENEW): attempt (compared as text), lease (ms), holder

local r = redis.call('HMGET', KEYS[3], 'attempt', 'holder', 'where', 'settled')
if r[1] ~= ARGV[F.attempt] or r[2] ~= ARGV[F.holder] or r[3] ~= 'running' or r[4]
    or not redis.call('ZSCORE', KEYS[1], KEYS[3]) then
  return 0
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local expiry = now + tonumber(ARGV[F.lease])
redis.call('ZADD', KEYS[1], 'XX', expiry, KEYS[3])
redis.call('ZADD', KEYS[2], 'XX', expiry, KEYS[3])
redis.call('HSET', KEYS[3], 'lease_exp', expiry)
redis.call('HSET', KEYS[4], 'last_ms', now)
return expiry
