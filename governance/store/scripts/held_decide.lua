-- held_decide.lua: a reviewer's decision on a held task, or its expiry, atomically with its
-- audit entry (lib.lua is prepended). An approval counts once per reviewer; the approval that
-- brings them to the quorum moves the task held -> released (exactly one caller sees
-- 'released'), records it in the ledger as queued with the message to publish (which carries
-- the signed approvals), and stores the grant its approvals asked for, if any. A rejection moves
-- held -> rejected, an expiry (when due) held -> expired; both end the task in the ledger. The
-- release itself is the caller's: it sends the message to publish only when the approvals it
-- verified reach the quorum (without it, an approval is recorded, whatever the count says).
--
-- Whoever writes Redis could mark a task released here: it would not run, because the worker
-- verifies the reviewers' signatures in the message, not this state.
--
-- KEYS[1..7]  the tenant's shared keys (see lib.lua)
-- KEYS[8]     held task            HASH
-- KEYS[9..13] status index         ZSET per status: held, suggested, released, rejected, expired
-- KEYS[14]    expiry index         ZSET
-- KEYS[15]    the task's ledger record   HASH
-- KEYS[16]    grants               HASH grant id -> JSON
--
-- ARGV (vocabulary.HELD_DECIDE): id, verdict (approve|reject|expire), reviewer, reason, now (ms),
-- quorum, signed (the signed decision, JSON; '': none), seen (approvals the release was built
-- from), release (the message to publish if this approval completes the quorum), grant_id,
-- grant_json, grant_until_ms (the grant its approvals asked for; '': none), au (the audit
-- template, `F.au`), ttl (task record, seconds); then the settings (`G`), the seals and the
-- writer's id.
--
-- Returns JSON {outcome, status, approvals, au}: outcome is one of recorded, released, rejected,
-- expired, unknown, not_held, already_approved, not_due, stale (the approvals changed since the
-- caller built its release: read again and retry).

local STATUSES = {held = 9, suggested = 10, released = 11, rejected = 12, expired = 13}
local G = read_settings(ARGV)
L.seal(ARGV[F.seals], ARGV[F.writer])
local au = L.template(ARGV, F.au)
local reason, quorum = ARGV[F.reason], tonumber(ARGV[F.quorum])
local written = {}
local function reply(outcome, status, approvals)
  return cjson.encode({outcome = outcome, status = status or '', approvals = approvals or 0,
    au = written})
end

local id, verdict, reviewer = ARGV[F.id], ARGV[F.verdict], ARGV[F.reviewer]
local now = tonumber(ARGV[F.now])
local status = redis.call('HGET', KEYS[8], 'status')
if not status then return reply('unknown') end
local approvals = tonumber(redis.call('HGET', KEYS[8], 'approvals') or '0')
if status ~= 'held' then return reply('not_held', status, approvals) end

local decisions = cjson.decode(redis.call('HGET', KEYS[8], 'decisions') or '[]')
if verdict == 'approve' then
  for _, d in ipairs(decisions) do
    if d.verdict == 'approve' and d.reviewer == reviewer then
      return reply('already_approved', status, approvals)
    end
  end
  if approvals + 1 >= quorum and approvals + 1 ~= tonumber(ARGV[F.seen]) then
    return reply('stale', status, approvals)
  end
end
if verdict == 'expire' and tonumber(redis.call('HGET', KEYS[8], 'expires_ms')) > now then
  return reply('not_due', status, approvals)
end

local function move(to)
  redis.call('ZREM', KEYS[STATUSES[status]], id)
  redis.call('ZADD', KEYS[STATUSES[to]], tonumber(redis.call('HGET', KEYS[8], 'requested_ms')), id)
  redis.call('ZREM', KEYS[14], id)
  redis.call('HSET', KEYS[8], 'status', to, 'decided_ms', now)
end
local function end_in_ledger()
  redis.call('HSET', KEYS[15], 'id', id)
  L.end_record(KEYS[15], now, tonumber(ARGV[F.ttl]))
end

decisions[#decisions + 1] = {verdict = verdict, reviewer = reviewer, reason = reason,
  at_ms = now, signed = json(ARGV[F.signed])}
redis.call('HSET', KEYS[8], 'decisions', cjson.encode(decisions))
if verdict == 'approve' then
  approvals = approvals + 1
  redis.call('HSET', KEYS[8], 'approvals', approvals)
  -- Only the caller decides a release, from the signatures it verified against the policy's
  -- keys: a count in Redis (which anyone who writes it can raise) never releases by itself.
  if approvals < quorum or not text(ARGV[F.release]) then
    L.task_entry(written, now, au, AT.approved, 'hold', reason,
      {approvals = approvals, quorum = quorum, reviewer = reviewer})
    return reply('recorded', status, approvals)
  end
  move('released')
  redis.call('HSET', KEYS[15], 'id', id, 'where', 'queued', 'since', now, 'msg',
    ARGV[F.release])
  redis.call('PERSIST', KEYS[15])
  redis.call('ZADD', L.T.ledger, now + G.grace, KEYS[15])
  L.task_entry(written, now, au, AT.released, 'allow', reason,
    {approvals = approvals, quorum = quorum, reviewer = reviewer})
  local grant = text(ARGV[F.grant_id])
  if grant then
    redis.call('HSET', KEYS[16], grant, ARGV[F.grant_json])
    L.task_entry(written, now, au, AT.grant_created, 'allow', reason,
      {grant = grant, until_ms = tonumber(ARGV[F.grant_until_ms])})
  end
  return reply('released', 'released', approvals)
end
if verdict == 'reject' then
  move('rejected')
  end_in_ledger()
  L.task_entry(written, now, au, AT.rejected, 'deny', reason, {reviewer = reviewer})
  return reply('rejected', 'rejected', approvals)
end
move('expired')
end_in_ledger()
L.task_entry(written, now, au, AT.expired, 'deny', reason, {})
return reply('expired', 'expired', approvals)
