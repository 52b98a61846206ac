-- removed_tenant.lua: the open tasks of a tenant that is no longer in the policy (lib.lua is
-- prepended). A reload that drops a tenant (on purpose, or by a typo) must neither strand its
-- work nor fail a backlog at once: its tasks wait out a grace (its max_wait, by default) for it
-- to come back, then end with the reason, each audited on the tenant's own chain. The modes:
--
--   notice   the maintenance (or `govctl tenants end`, with grace 0) finds the tenant removed:
--            when its tasks end is set once (removed_at, removed_deadline in its meta: a later
--            notice only brings it forward), with a `tenant_removed` entry;
--   deliver  a worker received one of its tasks (KEYS[8] the record): a task whose record is
--            unknown or done is left to the caller (an unknown tenant's message makes no key
--            here); one a live delivery runs, or a held one, is a copy; past the deadline, or
--            marked to end, it ends now (`authorization_denied`); otherwise it is parked out
--            of the broker until the deadline (`waiting`, violation tenant_removed, once);
--   end      past the deadline: a bounded walk of its ledger (ZSCAN from `cursor`) marks each
--            open task to end with the reason, and publishes those that are not in the broker
--            already, so their own deliveries end them (a task always ends on a worker, with its
--            result); running tasks finish (held ones are the held store's to end);
--   restore  it is in the policy again: the marks go, and its parked tasks are due now.
--
-- KEYS[1..7] the tenant's shared keys (see lib.lua); KEYS[8] deliver: the task's record.
-- ARGV (vocabulary.REMOVED_TENANT, SETTINGS, SEALS).
--
-- Returns JSON {state = 'unknown'|'done'|'copy'|'ended'|'parked' (deliver), until (ms),
--   reason, fresh = 1 when this call noticed it, open = ledger entries, pub = [{id, msg}],
--   cursor ('0': the walk is over), au = [...]}.

local G = read_settings(ARGV)
L.seal(ARGV[F.seals], ARGV[F.writer])
local now = L.now_ms()
local written, publish = {}, {}
local mode, tenant, reason = ARGV[F.mode], ARGV[F.tenant], ARGV[F.reason]
local ttl = tonumber(ARGV[F.ttl])

-- When the tenant's tasks end: set once (the first to notice), brought forward, never back.
local function deadline(grace)
  local r = redis.call('HMGET', L.T.meta, 'removed_at', 'removed_deadline')
  local current = tonumber(r[2] or '')
  local wanted = now + grace
  if current and current <= wanted then return current, false end
  redis.call('HSET', L.T.meta, 'removed_at', r[1] or now, 'removed_deadline', wanted)
  local by = ARGV[F.by]
  L.audit(written, now, {type = AT.tenant_removed, tenant = tenant, decision = 'deny',
    reviewer = by, reason = (by ~= '' and 'ended by an operator: ' or '') .. reason
      .. (grace > 0 and string.format(' (its open tasks end in %d s unless it comes back)',
        math.floor(grace / 1000)) or ' (its open tasks end now)'),
    detail = {ends_at_ms = wanted, open = redis.call('ZCARD', L.T.ledger)}})
  return wanted, true
end

if mode == 'notice' then
  local until_ms, fresh = deadline(tonumber(ARGV[F.removal_grace]))
  return cjson.encode({until_ms = until_ms, fresh = fresh and 1 or 0,
    open = redis.call('ZCARD', L.T.ledger), au = written})
end

if mode == 'deliver' then
  local rec, id = KEYS[8], ARGV[F.id]
  if redis.call('EXISTS', rec) == 0 then return cjson.encode({state = 'unknown', au = written}) end
  local r = redis.call('HMGET', rec, 'where', 'fail', 'removed')
  if r[1] == 'done' then return cjson.encode({state = 'done', au = written}) end
  if r[1] == 'held' or L.running_live(rec, now) then
    return cjson.encode({state = 'copy', au = written})
  end
  local until_ms, fresh = deadline(tonumber(ARGV[F.removal_grace]))
  if r[2] or now >= until_ms then
    local why = r[2] or reason
    L.end_record(rec, now, ttl)
    L.audit(written, now, {type = AT.authorization_denied, tenant = tenant, task_id = id,
      decision = 'deny', reason = why})
    return cjson.encode({state = 'ended', reason = why, au = written})
  end
  L.let_go(rec)
  redis.call('HSET', rec, 'where', 'parked', 'since', now, 'removed', '1')
  redis.call('HDEL', rec, 'settled')
  redis.call('ZADD', L.T.ledger, until_ms, rec)
  if not r[3] then
    L.audit(written, now, {type = AT.waiting, tenant = tenant, task_id = id, decision = 'wait',
      reason = 'tenant not in the policy: it waits for the tenant to come back',
      detail = {violation = 'tenant_removed', until_ms = until_ms}})
  end
  return cjson.encode({state = 'parked', until_ms = until_ms, fresh = fresh and 1 or 0,
    au = written})
end

-- end, restore: a bounded walk of the ledger.
L.load_admission(true)
local scanned = redis.call('ZSCAN', L.T.ledger, ARGV[F.cursor], 'COUNT', G.sweep_limit)
local cursor = scanned[1]

if mode == 'restore' then
  redis.call('HDEL', L.T.meta, 'removed_at', 'removed_deadline')
  for i = 1, #scanned[2], 2 do
    local rec = scanned[2][i]
    if redis.call('HGET', rec, 'removed') == '1' then
      redis.call('HDEL', rec, 'removed')
      if redis.call('HGET', rec, 'where') == 'parked' then redis.call('ZADD', L.T.ledger, now, rec) end
    end
  end
  if ARGV[F.cursor] == '0' then
    L.audit(written, now, {type = AT.tenant_restored, tenant = tenant, decision = 'allow',
      reason = 'the tenant is in the policy again: its tasks go on'})
  end
  return cjson.encode({cursor = cursor, au = written})
end

for i = 1, #scanned[2], 2 do
  local rec, score = scanned[2][i], tonumber(scanned[2][i + 1])
  local r = redis.call('HMGET', rec, 'id', 'where', 'msg', 'fail')
  local id, where, msg = r[1], r[2], r[3]
  if not where or where == 'done' or not id or not msg then
    redis.call('ZREM', L.T.ledger, rec)
  elseif where == 'held' then
    -- Ended by the held store (the caller), with its decision.
  elseif where == 'running' and L.running_live(rec, now) then
    -- It runs now: it finishes (its settlement ends it).
  else
    if not r[4] then redis.call('HSET', rec, 'fail', reason) end
    -- A queued task that is not overdue has its message in the broker: its delivery ends it.
    if where ~= 'queued' or score <= now then
      L.let_go(rec)
      L.requeue(rec, now, G)
      publish[#publish + 1] = {id = id, msg = msg}
    end
  end
end
return cjson.encode({cursor = cursor, pub = publish,
  open = redis.call('ZCARD', L.T.ledger), au = written})
