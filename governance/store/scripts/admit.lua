-- admit.lua: one delivery of one governed task asks to run, in one atomic call (lib.lua is
-- prepended). It decides from the task's ledger record first (a copy of a message that already
-- ran, runs, waits or was handed on is dropped), then, for a fresh arrival: reclaims the slots of
-- dead workers, hands free capacity to the oldest waiting tasks of the tenant, and evaluates the
-- task itself: rejected (a limit that waiting does not fix), waiting (at the tail of the tenant's
-- wait list, its message acknowledged), booked (a rate-limit or cooldown turn taken for it) or
-- admitted (lease and reservations taken). Its audit entry is written in the same call.
--
-- KEYS[1..7]  the tenant's shared keys (see lib.lua)
-- KEYS[8]     the task's record      HASH
-- KEYS[9]     provider cooldown      STRING (or a placeholder key of the tenant)
-- KEYS[10]    provider rate          STRING (or a placeholder key of the tenant)
-- KEYS[11..13] usage of the run, day and month windows   HASH
-- KEYS[14]    step repetitions of the run  HASH
-- KEYS[15]    the tenant's tasks published to the broker, not yet received   ZSET
--
-- ARGV: the admission request (vocabulary.ADMISSION: `R`, read into `req` by read_request), the
-- settings (`G`), the seals of this writer's earlier entries and the writer's id (`F.seals`,
-- `F.writer`). What each field means is declared in governance/store/vocabulary.py.
--
-- At publication (`at_publish`, fair dispatch): the publisher asks before sending anything. A
-- task that must wait (its tenant's limits, or the saturated pool: `pool_wait`) waits from
-- here, never entering the broker; one that may run now is handed a slot (`handed`, with the
-- token its message carries); for anything else (a turn to book, a limit that rejects, a cost
-- alert) its delivery decides (`send`).
--
-- Returns JSON {s = admitted | waiting | booked | rejected | alert | settled | duplicate | stale |
--   early | handed | send,
--   v, cur, lim, ci, cv, le (lease expiry), turn, wait, parked, first (first wait of the
--   attempt), token (handed), queued_ms (how long the message waited in the broker),
--   au (audit entries written: [[stream id, [field, value, ...]], ...]),
--   pub (tasks to publish: [{id, msg, token}])}

local req = read_request(ARGV)
req.k = {rec = KEYS[8], cd = req[R.has_cooldown] and KEYS[9] or '',
  pr = req[R.has_provider_rate] and KEYS[10] or '', w = {KEYS[11], KEYS[12], KEYS[13]},
  steps = KEYS[14]}
local at_publish = req[R.at_publish]
local G = read_settings(ARGV)
L.seal(ARGV[F.seals], ARGV[F.writer])
local now = L.now_ms()
local rec = req.k.rec
local au = L.template(req, R.au)
local written, publish = {}, {}

local queued_ms
local function reply(t)
  t.au = written
  t.pub = publish
  t.queued_ms = queued_ms
  return cjson.encode(t)
end

local r = redis.call('HMGET', rec, 'attempt', 'where', 'settled', 'holder', 'lease_exp',
  'handoff', 'turn', 'skip', 'wait_since', 'fail', 'paused_since', 'since', 'counted', 'resv')
req.counted, req.no_resv = r[13] ~= false, r[14] == false
local attempt, where, settled, holder, lease_exp = r[1], r[2], r[3], r[4], r[5]
local handoff, turn, skip, wait_since, fail = r[6], r[7], r[8], r[9], r[10]
local paused_since = r[11]
-- A message received: it is no longer in the broker (and how long it waited there says whether
-- the worker pool is backlogged).
if redis.call('ZREM', KEYS[15], rec) == 1 and where == 'queued' and r[12] and not at_publish then
  queued_ms = now - tonumber(r[12])
end
local A = req[R.attempt]
local same = attempt == tostring(A)
local live = lease_exp and tonumber(lease_exp) > now and redis.call('ZSCORE', L.T.leases, rec)

-- `run` is the run window as the evaluation read it, when it did (else it is read here).
local function admitted_entry(waited_since, run)
  local detail = {attempt = A}
  if waited_since then detail.waited_ms = now - tonumber(waited_since) end
  if req[R.outage_count] then
    detail.outage_deferrals = req[R.outage_count]
    detail.outage_since_ms = req[R.outage_since]
  end
  L.task_entry(written, now, au, AT.admitted, 'allow', '', detail)
  -- The run's wall time at or over the warning threshold: audited once per run.
  local wall = req[R.wall_time_ms]
  if wall and wall > 0 then
    local started, warned
    if run then
      started, warned = run.has_started and run.started_ms, run.wall_warned > 0
    else
      local w = redis.call('HMGET', req.k.w[1], 'started_ms', 'wall_warned')
      started, warned = w[1] and tonumber(w[1]), w[2] ~= false
    end
    local elapsed = started and (now - started) or 0
    if not warned and elapsed * 100 >= (req[R.warn] or 80) * wall then
      redis.call('HSET', req.k.w[1], 'wall_warned', 1)
      L.task_entry(written, now, au, AT.limit_warning, 'allow', '', {
        violation = V.wall_time_limit, current = elapsed, limit = wall,
        percent = math.floor(elapsed * 100 / wall)})
    end
  end
end

local function finish_rejected(verdict, reason)
  L.end_record(rec, now, req[R.ttl_task])
  -- `rejected` keeps the reason for a copy of this delivery (a replayed call whose reply was
  -- lost), so it ends the same way.
  redis.call('HSET', rec, 'id', req[R.id], 'attempt', A, 'settled', 1, 'rejected', reason)
  local detail = L.violation_detail(verdict)
  L.task_entry(written, now, au, AT.task_failed, 'deny', reason, detail)
  return reply({s = 'rejected', v = verdict.v, cur = verdict.cur, lim = verdict.lim,
    ci = verdict.ci or 0, cv = verdict.cv or {}, reason = reason})
end

if attempt and tonumber(attempt) > A then return reply({s = 'stale'}) end
-- A later attempt runs only on the marker the settlement of the attempt before it wrote when
-- it scheduled it (`next_attempt`, see settle.lua), never on its attempt number alone: a copy
-- of a message with its number raised (a replayed release sent as "the next retry"), or a
-- later attempt of a task with no record, ends here.
if not same and A > 0 and redis.call('HGET', rec, 'next_attempt') ~= tostring(A) then
  return reply({s = 'settled', replayed = true})
end
if same then
  if settled == '1' or where == 'done' then
    -- `final`: this was the task's last attempt (no retry follows), so a copy that finds no
    -- result stored for it stores one (its worker died before Celery stored it).
    if where ~= 'done' then return reply({s = 'settled'}) end
    return reply({s = 'settled', final = true, reason = redis.call('HGET', rec, 'rejected')})
  end
  if where == 'running' and live then
    if holder == req[R.holder] then return reply({s = 'admitted', le = tonumber(lease_exp)}) end
    return reply({s = 'duplicate'})
  end
  if where == 'handed' and live then
    if req[R.handoff] and req[R.handoff] == handoff then
      -- The message handed on from the wait list: this delivery takes the slot kept for it.
      local exp = now + G.lease
      redis.call('ZADD', L.T.leases, exp, rec)
      redis.call('HSET', rec, 'holder', req[R.holder], 'where', 'running', 'since', now,
        'lease_exp', exp)
      redis.call('HDEL', rec, 'handoff')
      redis.call('ZADD', L.T.ledger, exp, rec)
      admitted_entry(wait_since)
      return reply({s = 'admitted', le = exp})
    end
    return reply({s = 'duplicate'})
  end
  if where == 'waiting' and redis.call('ZSCORE', L.T.waiting, rec) then
    return reply({s = 'duplicate'})
  end
  if turn and (where == 'queued' or where == 'parked') and tonumber(turn) > now + G.slack then
    return reply({s = 'early', turn = tonumber(turn)})
  end
  if fail then
    return finish_rejected({v = redis.call('HGET', rec, 'wait_for') or 'max_wait', kind = 'reject'},
      fail)
  end
end

-- A fresh arrival.
L.load_admission()
-- Waiting tasks go first (the hand-off), unless capacity is the pool's to give (fair dispatch,
-- `pool_gated`) or nothing was received yet (at publication).
-- A message published before the oldest waiting task began to wait (it was in the broker
-- meanwhile) is not behind it: it is evaluated first. Within the same millisecond the order is
-- unknown; the message counts as first (a hand-off counts it as ahead, too: C.concurrency).
local function published_first()
  if where ~= 'queued' or not r[12] then return false end
  local head = redis.call('ZRANGE', L.T.waiting, 0, 0)[1]
  local began = head and redis.call('HGET', head, 'wait_since')
  return began and tonumber(began) >= tonumber(r[12]) or false
end
if not at_publish and not req[R.pool_gated] and redis.call('ZCARD', L.T.waiting) > 0
    and not published_first() then
  L.load_admission(true)
  L.handoff(now, G, {pub = publish, written = written}, req[R.au_policy_version])
end
if req[R.envelope] then redis.call('HSETNX', rec, 'msg', req[R.envelope]) end

local since = (same and wait_since) and tonumber(wait_since) or now
-- The run's idle time ends when this step came: when it began to wait in line, or earlier, when
-- it began to wait for its reviewers or for its retry's delay (`paused_since`).
local came = paused_since and math.min(since, tonumber(paused_since)) or since
local verdict = L.evaluate(req, now, same and skip or '', nil, G.reclaim, came)

if at_publish then
  if verdict.kind == 'admit' and req[R.pool_wait] then
    verdict = {kind = 'wait', limit = 'pool', v = V.pool_saturated, cur = 0, lim = 0, ci = 0,
      cv = verdict.cv}
  elseif verdict.kind == 'admit' then
    -- It may run now: a slot is kept for its message, which carries the token.
    L.load_admission(true)
    local n = redis.call('HINCRBY', rec, 'handoffs', 1)
    local token = req[R.id] .. ':' .. A .. ':' .. n
    L.commit(req, now, verdict, token, 'handed', now + G.grace, now + G.grace)
    redis.call('HSET', rec, 'handoff', token)
    return reply({s = 'handed', token = token, le = now + G.grace})
  elseif verdict.kind ~= 'wait' then
    -- A turn to book, a limit that rejects, a cost alert: its delivery decides.
    redis.call('ZADD', KEYS[15], now, rec)
    return reply({s = 'send'})
  end
end

if verdict.kind == 'book' and verdict.turn - since > req[R.max_wait] then
  verdict.kind = 'reject'
  return finish_rejected(verdict, string.format(
    '%s: the next turn is in %d ms, which would exceed the wait limit of %d ms',
    verdict.v, verdict.turn - now, req[R.max_wait]))
end
if verdict.kind == 'reject' then
  return finish_rejected(verdict,
    verdict.reason or L.violation_text(verdict.v, verdict.cur, verdict.lim))
end
if verdict.kind == 'hold' then
  -- The caller holds it for the reviewers (the held store records it, with its audit entry).
  return reply({s = 'alert', v = verdict.v, cur = verdict.cur, lim = verdict.lim})
end
if verdict.kind == 'wait' or verdict.kind == 'book' then L.load_admission(true) end
if verdict.kind == 'wait' then
  local first, wait_start = L.enqueue(req, L.kept_request(ARGV, req.k), now, verdict)
  if first then
    L.task_entry(written, now, au, AT.waiting, 'allow', verdict.v, L.violation_detail(verdict))
  end
  return reply({s = 'waiting', v = verdict.v, cur = verdict.cur, lim = verdict.lim,
    ci = verdict.ci, cv = verdict.cv, first = first, since = wait_start,
    ahead = redis.call('ZRANK', L.T.waiting, rec)})
end
if verdict.kind == 'book' then
  local first, parked = L.book(req, now, verdict, G)
  if first then
    L.task_entry(written, now, au, AT.waiting, 'allow', verdict.v, L.violation_detail(verdict))
  end
  return reply({s = 'booked', v = verdict.v, cur = verdict.cur, lim = verdict.lim,
    turn = verdict.turn, wait = verdict.wait, parked = parked, first = first, cv = verdict.cv})
end

local exp = now + G.lease
L.commit(req, now, verdict, req[R.holder], 'running', exp, exp)
admitted_entry(same and wait_since or nil, verdict.cache and verdict.cache[req.k.w[1]])
return reply({s = 'admitted', le = exp, cv = verdict.cv})
