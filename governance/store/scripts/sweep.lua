-- sweep.lua: the reconciler's round for one tenant, in one atomic call (lib.lua is prepended).
-- Every governed task that is not done has a ledger entry scored by the time someone must look
-- at it again; this script takes the due ones:
--   queued           published but never received in time (lost between broker and worker):
--                    published again, with a growing grace (counted as republished);
--   parked           a parked wait that is due: published, queued from now on;
--   handed           a hand-off whose message did not arrive: published again, same token;
--   running          its lease expired (its worker died): published again for a new delivery;
--   waiting          it waited longer than its wait limit: published with the reason, so its
--                    own delivery ends it (a task always ends on a worker, with its result);
--   held, done       nothing to do (held tasks have their own expiry).
-- Then it hands free capacity to the oldest waiting tasks that fit (capacity freed by a lease
-- reclaimed from a dead worker, a run closed, a policy change), unless the worker pool is
-- saturated (`pool_gated`: fair dispatch gives capacity). A paused tenant's tasks are not
-- failed for waiting past their limit while it is paused, and their limit counts again from
-- when it was resumed (`ctl_resumed_at`).
--
-- KEYS[1..7]  the tenant's shared keys (see lib.lua)
--
-- ARGV (vocabulary.SWEEP): a run to close first (`close_tenant`, `close_run`, `close_by`; '':
-- none), its run slot freed now; the caller's policy version ('': any, see L.handoff); then the
-- settings (`G`: `sweep_limit` entries per call at most; `reclaim`: leases of dead workers may be
-- reclaimed, not just after an outage of the state store), the seals and the writer's id.
--
-- Returns JSON {pub = [{id, msg, token, again}], au = [...], more = 1 when due entries remain,
--   closed = 1 when the run to close was in flight}.

local G = read_settings(ARGV)
L.seal(ARGV[F.seals], ARGV[F.writer])
L.load_admission(true)
local now = L.now_ms()
local written, publish = {}, {}
local closed = 0

local close_run = ARGV[F.close_run]
if close_run ~= '' then
  local until_ms = tonumber(redis.call('ZSCORE', L.T.runs, close_run) or '0')
  redis.call('ZREM', L.T.runs, close_run)
  if until_ms > now then closed = 1 end
  L.audit(written, now, {type = AT.run_closed, tenant = ARGV[F.close_tenant], run = close_run,
    decision = 'allow', reviewer = ARGV[F.close_by],
    reason = closed == 1 and 'closed: its run slot is free' or 'closed (it was not in flight)'})
end

if G.reclaim then L.reclaim(now) end

-- The grace before a published task counts as lost grows with each re-publication, so a long
-- broker backlog costs a few duplicate messages (dropped by admission), not a storm.
local function again(rec)
  redis.call('HINCRBY', L.T.meta, 'republished', 1)
  local n = redis.call('HINCRBY', rec, 'republished', 1)
  local grace = math.min(G.grace * 2 ^ math.min(n - 1, 16), G.grace_max)
  redis.call('ZADD', L.T.ledger, now + grace, rec)
end

local due = redis.call('ZRANGEBYSCORE', L.T.ledger, '-inf', now, 'LIMIT', 0, G.sweep_limit)
for _, rec in ipairs(due) do
  local r = redis.call('HMGET', rec, 'id', 'where', 'lease_exp', 'msg', 'handoff', 'wait_since',
    'wait_for', 'req')
  local id, where, lease_exp, msg, token = r[1], r[2], r[3], r[4], r[5]
  if not where or not id or not msg then
    -- Nothing to publish it from (a record without a message): forget it, loudly.
    redis.call('ZREM', L.T.ledger, rec)
    if where and id then
      L.audit(written, now, {type = AT.task_lost, task_id = id,
        reason = 'the ledger holds no message to publish this task again'})
    end
  elseif where == 'parked' then
    -- A parked wait that is due: published now, not a re-publication of something lost.
    L.requeue(rec, now, G)
    publish[#publish + 1] = {id = id, msg = msg}
  elseif where == 'queued' then
    redis.call('HSET', rec, 'where', 'queued', 'since', now)
    again(rec)
    publish[#publish + 1] = {id = id, msg = msg, again = 1}
  elseif where == 'handed' then
    local since = tonumber(r[6] or now)
    local max_wait = L.kept_max_wait(r[8], G.grace_max)
    if now - since > max_wait and not redis.call('ZSCORE', L.T.leases, rec) then
      redis.call('HSET', rec, 'fail', string.format(
        'waited %d s for %s without starting (wait limit %d s)',
        math.floor((now - since) / 1000), r[7] or 'capacity', math.floor(max_wait / 1000)))
      L.requeue(rec, now, G)
      publish[#publish + 1] = {id = id, msg = msg}
    else
      again(rec)
      publish[#publish + 1] = {id = id, msg = msg, token = token, again = 1}
    end
  elseif where == 'running' then
    if G.reclaim and tonumber(lease_exp or '0') <= now then
      redis.call('HSET', rec, 'where', 'queued', 'since', now)
      redis.call('HDEL', rec, 'holder')
      again(rec)
      publish[#publish + 1] = {id = id, msg = msg, again = 1}
    else
      redis.call('ZADD', L.T.ledger, math.max(now + G.grace, tonumber(lease_exp or now)), rec)
    end
  elseif where == 'waiting' and redis.call('HGET', L.T.meta, 'ctl_paused') == '1' then
    -- Paused by an operator: waiting is not failed meanwhile; looked at again later.
    redis.call('ZADD', L.T.ledger, now + G.grace, rec)
  elseif where == 'waiting' and now - math.max(tonumber(r[6] or now),
      tonumber(redis.call('HGET', L.T.meta, 'ctl_resumed_at') or '0'))
      <= L.kept_max_wait(r[8], G.grace_max) then
    -- Its wait began again when its tenant was resumed: not past its limit yet.
    redis.call('ZADD', L.T.ledger, now + G.grace, rec)
  elseif where == 'waiting' then
    local max_wait = L.kept_max_wait(r[8], G.grace_max)
    local since = tonumber(r[6] or now)
    redis.call('ZREM', L.T.waiting, rec)
    redis.call('HSET', rec, 'fail', string.format(
      'waited %d s for %s without starting (wait limit %d s)',
      math.floor((now - since) / 1000), r[7] or 'capacity', math.floor(max_wait / 1000)))
    redis.call('HDEL', rec, 'req')
    L.requeue(rec, now, G)
    publish[#publish + 1] = {id = id, msg = msg}
  else
    redis.call('ZREM', L.T.ledger, rec)
  end
end

if ARGV[F.pool_gated] ~= '1' and redis.call('ZCARD', L.T.waiting) > 0 then
  L.handoff(now, G, {pub = publish, written = written}, text(ARGV[F.policy_version]))
end
local more = #due >= G.sweep_limit and 1 or 0
return cjson.encode({pub = publish, au = written, more = more, closed = closed})
