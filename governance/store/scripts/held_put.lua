-- held_put.lua: record a task that waits for reviewers (status held) or a non-blocking
-- suggestion (status suggested), with its audit entry and its notification, in one atomic call
-- (lib.lua is prepended). Idempotent: a task already waiting is left as it is. A task whose hold
-- already ended (released, rejected, expired) and that shows up again is held again, with a
-- fresh request and no decisions, only while the task itself has not ended (a release that
-- expired while it waited, a call held at its run's cost alert after its release). A task that
-- ended (its ledger record done, or gone) is never reopened: the copy (a plain copy of the
-- message, a replayed release) is dropped, audited as `release_replayed`.
-- The task's ledger record follows (unless a live delivery runs the task, a copy arriving
-- meanwhile): a held task lets go of what it held or waited for (a hand-off's slot and
-- reservation, its place in the wait list, the start of its wait) and leaves the ledger until
-- released; a suggestion ends there.
--
-- KEYS[1..7]  the tenant's shared keys (see lib.lua)
-- KEYS[8]     held task            HASH
-- KEYS[9..13] status index         ZSET per status: held, suggested, released, rejected, expired
-- KEYS[14]    expiry index         ZSET task id -> expires at (ms), only while held
-- KEYS[15]    the task's ledger record   HASH
-- KEYS[16]    notification outbox  ZSET notification id -> when to try (ms)
-- KEYS[17]    notifications        HASH notification id -> JSON
--
-- ARGV (vocabulary.HELD_PUT): id, status, requested_ms, expires_ms, task (the held task's fields,
-- JSON {name: value}), au (the audit template, `F.au`), reason, detail (JSON), notify (the
-- notification's JSON; '': none), ttl (seconds an ended ledger record is kept); then the seals
-- and the writer's id.
--
-- Returns JSON {outcome = created | waiting | reheld | ended, status, au}.

local STATUSES = {held = 9, suggested = 10, released = 11, rejected = 12, expired = 13}
L.seal(ARGV[F.seals], ARGV[F.writer])
local now = L.now_ms()
local written = {}
local id, status = ARGV[F.id], ARGV[F.status]
local requested_ms, expires_ms = tonumber(ARGV[F.requested_ms]), tonumber(ARGV[F.expires_ms])
local current = redis.call('HGET', KEYS[8], 'status')
if current == 'held' or current == 'suggested' then
  return cjson.encode({outcome = 'waiting', status = current, au = written})
end
local rec = KEYS[15]
local outcome = 'created'
if current then
  local where = redis.call('HGET', rec, 'where')
  if not where or where == 'done' then
    L.task_entry(written, now, L.template(ARGV, F.au), AT.release_replayed, 'deny',
      'a copy of a task that ended (its hold was ' .. current .. '): dropped, never held again',
      {status = current, record = where or 'gone'})
    return cjson.encode({outcome = 'ended', status = current, au = written})
  end
  outcome = 'reheld'
  redis.call('ZREM', KEYS[STATUSES[current]], id)
  redis.call('HINCRBY', KEYS[8], 'reheld', 1)
  redis.call('HDEL', KEYS[8], 'decided_ms')
end
local fields = {}
for name, value in pairs(json(ARGV[F.task])) do
  fields[#fields + 1] = name
  fields[#fields + 1] = value
end
redis.call('HSET', KEYS[8], 'status', status, 'requested_ms', requested_ms, 'expires_ms',
  expires_ms, 'decisions', '[]', 'approvals', 0, unpack(fields))
redis.call('ZADD', KEYS[STATUSES[status]], requested_ms, id)
if status == 'held' then
  redis.call('ZADD', KEYS[14], expires_ms, id)
  if not L.running_live(rec, now) then
    L.let_go(rec)
    redis.call('HSET', rec, 'id', id, 'where', 'held', 'since', now)
    -- Waiting for reviewers is not idle time of the run (the first hold counts).
    redis.call('HSETNX', rec, 'paused_since', now)
    redis.call('PERSIST', rec)
    redis.call('ZREM', L.T.ledger, rec)
  end
elseif redis.call('EXISTS', rec) == 1 and not L.running_live(rec, now) then
  L.end_record(rec, now, tonumber(ARGV[F.ttl]))
end
local detail = json(ARGV[F.detail]) or {}
detail.outcome = outcome
L.task_entry(written, now, L.template(ARGV, F.au), status == 'held' and AT.held or AT.suggested,
  status == 'held' and 'hold' or 'suggest', ARGV[F.reason], detail)
local notify = text(ARGV[F.notify])
if notify then
  -- One notification per hold of the task (a task held again is notified again).
  local nid = id .. ':' .. (redis.call('HGET', KEYS[8], 'reheld') or '0')
  redis.call('HSET', KEYS[17], nid, notify)
  redis.call('ZADD', KEYS[16], now, nid)
end
return cjson.encode({outcome = outcome, status = status, au = written})
