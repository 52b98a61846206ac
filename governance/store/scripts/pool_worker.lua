-- pool_worker.lua: a worker of a queue's pool says it is alive and how many tasks it runs at
-- once (its heartbeat, every few seconds), or that it leaves. The pool's capacity is the sum of
-- the live workers' pool sizes: a worker that stops beating (killed) leaves it when its entry
-- expires. Entries of workers gone for good are removed here.
--
-- KEYS[1]  the pool's workers   HASH node -> "<pool size>:<expires ms>"
--
-- ARGV (vocabulary.POOL_WORKER): node, concurrency (0: it leaves), ttl_ms.
--
-- Returns the pool's capacity now (its live workers' pool sizes).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local node, concurrency = ARGV[F.node], tonumber(ARGV[F.concurrency])
if concurrency > 0 then
  redis.call('HSET', KEYS[1], node, concurrency .. ':' .. (now + tonumber(ARGV[F.ttl_ms])))
else
  redis.call('HDEL', KEYS[1], node)
end
local capacity = 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local size, expires = string.match(entries[i + 1], '^(%d+):(%d+)$')
  if size and tonumber(expires) > now then
    capacity = capacity + tonumber(size)
  else
    redis.call('HDEL', KEYS[1], entries[i])
  end
end
return capacity
