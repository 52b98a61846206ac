-- cooldown.lua: record that a provider asked callers to wait (Retry-After). Only ever extends an
-- existing cooldown, so concurrent 429s keep the latest deadline. Returns the deadline (ms).
--
-- KEYS[1] provider cooldown   STRING until (ms)
-- ARGV (vocabulary.COOLDOWN): wait_ms

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local wait = tonumber(ARGV[F.wait_ms])
local deadline = now + wait
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if deadline > current then
  redis.call('SET', KEYS[1], deadline, 'PX', math.max(1, wait))
  return deadline
end
return current
