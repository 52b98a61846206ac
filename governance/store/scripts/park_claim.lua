-- park_claim.lua: claim parked messages that are due, for re-publishing.
-- Due messages move from the due set to the claimed set with a claim deadline; a claimer that
-- dies before acknowledging (after publishing) loses its claim at the deadline and the message is
-- claimed again, so nothing parked is ever lost (at worst published twice, which admission's
-- per-attempt idempotency absorbs).
--
-- KEYS[1] due        ZSET  message id -> due time (ms)
-- KEYS[2] claimed    ZSET  message id -> claim deadline (ms)
-- KEYS[3] messages   HASH  message id -> message (JSON)
--
-- ARGV[1] max messages to claim    ARGV[2] claim duration (ms)
--
-- Returns {id_1, message_1, id_2, message_2, ...}.

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local limit = tonumber(ARGV[1])
local deadline = now + tonumber(ARGV[2])
local result = {}

local function claim(ids, from)
  for _, id in ipairs(ids) do
    local message = redis.call('HGET', KEYS[3], id)
    redis.call('ZREM', from, id)
    if message then
      redis.call('ZADD', KEYS[2], deadline, id)
      result[#result + 1] = id
      result[#result + 1] = message
    end
  end
end

claim(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit), KEYS[2])
local room = limit - #result / 2
if room > 0 then
  claim(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, room), KEYS[1])
end
return result
