-- held_decide.lua: a reviewer's decision on a held task, atomically. An approval counts once
-- per reviewer; when the approvals reach the quorum the status moves held -> released (exactly
-- one caller sees 'released') and the release token's hash is stored for the worker to consume.
-- A rejection moves held -> rejected; an expiry (reviewer '') moves held -> expired when due.
--
-- KEYS[1] held task         HASH
-- KEYS[2..6] status index   ZSET per status: held, suggested, released, rejected, expired
-- KEYS[7] expiry index      ZSET
-- KEYS[8] unpublished       SET   released tasks not yet published again
--
-- ARGV[1] task id   ARGV[2] verdict (approve|reject|expire)   ARGV[3] reviewer
-- ARGV[4] reason    ARGV[5] now (ms)   ARGV[6] quorum   ARGV[7] hash of the release token
--
-- Returns {outcome, status, approvals}: outcome is one of recorded, released, rejected,
-- expired, unknown, not_held, already_approved, not_due.

local STATUSES = {held = 2, suggested = 3, released = 4, rejected = 5, expired = 6}
local id, verdict, reviewer, reason = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now, quorum = tonumber(ARGV[5]), tonumber(ARGV[6])
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'unknown', '', '0'} end
local approvals = tonumber(redis.call('HGET', KEYS[1], 'approvals') or '0')
if status ~= 'held' then return {'not_held', status, tostring(approvals)} end

local decisions = cjson.decode(redis.call('HGET', KEYS[1], 'decisions') or '[]')
if verdict == 'approve' then
  for _, d in ipairs(decisions) do
    if d.verdict == 'approve' and d.reviewer == reviewer then
      return {'already_approved', status, tostring(approvals)}
    end
  end
end
if verdict == 'expire' and tonumber(redis.call('HGET', KEYS[1], 'expires_ms')) > now then
  return {'not_due', status, tostring(approvals)}
end

local function move(to)
  redis.call('ZREM', KEYS[STATUSES[status]], id)
  redis.call('ZADD', KEYS[STATUSES[to]], tonumber(redis.call('HGET', KEYS[1], 'requested_ms')), id)
  redis.call('ZREM', KEYS[7], id)
  redis.call('HSET', KEYS[1], 'status', to, 'decided_ms', now)
end

decisions[#decisions + 1] = {verdict = verdict, reviewer = reviewer, reason = reason, at_ms = now}
redis.call('HSET', KEYS[1], 'decisions', cjson.encode(decisions))
if verdict == 'approve' then
  approvals = approvals + 1
  redis.call('HSET', KEYS[1], 'approvals', approvals)
  if approvals < quorum then return {'recorded', status, tostring(approvals)} end
  move('released')
  redis.call('HSET', KEYS[1], 'token_hash', ARGV[7], 'published', 0)
  redis.call('SADD', KEYS[8], id)
  return {'released', 'released', tostring(approvals)}
end
if verdict == 'reject' then
  move('rejected')
  return {'rejected', 'rejected', tostring(approvals)}
end
move('expired')
return {'expired', 'expired', tostring(approvals)}
