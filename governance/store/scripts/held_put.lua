-- held_put.lua: record a task that waits for a reviewer (status held) or a non-blocking
-- suggestion (status suggested). Idempotent: a task already waiting is left as it is. A task
-- whose hold already ended (released, rejected, expired) and that shows up again - a copied
-- message, a forged release header - is held again, with a fresh request, never run.
--
-- KEYS[1] held task         HASH
-- KEYS[2..6] status index   ZSET per status: held, suggested, released, rejected, expired
-- KEYS[7] expiry index      ZSET task id -> expires at (ms), only while held
--
-- ARGV[1] task id   ARGV[2] status (held|suggested)   ARGV[3] requested at (ms)
-- ARGV[4] expires at (ms)   ARGV[5..] field/value pairs of the record
--
-- Returns {'created' | 'waiting' | 'reheld', status}.

local STATUSES = {held = 2, suggested = 3, released = 4, rejected = 5, expired = 6}
local id, status, requested, expires = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local current = redis.call('HGET', KEYS[1], 'status')
if current == 'held' or current == 'suggested' then return {'waiting', current} end
local outcome = 'created'
if current then
  outcome = 'reheld'
  redis.call('ZREM', KEYS[STATUSES[current]], id)
  redis.call('HINCRBY', KEYS[1], 'reheld', 1)
  redis.call('HDEL', KEYS[1], 'token_hash', 'token_used', 'released_ms', 'published')
end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], 'status', status, 'requested_ms', requested, 'expires_ms', expires,
  'decisions', '[]', 'approvals', 0, unpack(fields))
redis.call('ZADD', KEYS[STATUSES[status]], requested, id)
if status == 'held' then redis.call('ZADD', KEYS[7], expires, id) end
return {outcome, status}
