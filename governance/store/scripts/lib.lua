-- lib.lua: the functions the admission, settlement, sweep and held scripts share. It is prepended
-- to each of those scripts when they are loaded (governance/store/lua.py), so each script stays
-- one atomic call, and the rules below exist once.
--
-- Every script that uses this library receives the tenant's shared keys first:
--   KEYS[1] leases      ZSET  record key -> lease expiry (ms): a member per running (or handed) task
--   KEYS[2] waiting     ZSET  record key -> wait position: the tenant's FIFO wait list
--   KEYS[3] ledger      ZSET  record key -> when the reconciler must look at the task again (ms)
--   KEYS[4] meta        HASH  wait_seq, audit_seq (counters of the tenant)
--   KEYS[5] audit       STREAM the tenant's audit chain (entries and seals)
--   KEYS[6] tenant rate STRING GCRA theoretical arrival time (ms)
--   KEYS[7] runs        ZSET  run id -> when the run stops being in flight (ms)
--
-- A task's own keys (its record, its usage windows, its provider's cooldown and rate) are passed
-- in KEYS by the script that admits it (and kept in its request, `req.k`, while it waits). A task
-- handed on from the wait list is admitted from the request stored in its record, and a lease
-- reclaimed from a dead worker is found by its record key: those keys carry the same hash tag
-- `{tenant}`, so they live in the same Redis Cluster slot as KEYS[1].
--
-- The task record (HASH) is the ledger of one task, from publication to its end:
--   attempt, where (queued|parked|waiting|handed|running|held|done), since (ms), settled (1 once
--   the attempt settled), holder, lease_exp, resv and resv_w (the reservation it holds, and the
--   usage windows it is counted in), handoff (token of a hand-off), turn (booked time),
--   skip (rates already booked: "t", "p", "tp"), wait_since, wait_for, wait_seq, req (the request,
--   while waiting), msg (the message envelope, to publish it again), counted, republished,
--   fail (a reason the next delivery ends the task with), paused_since (when it began to wait
--   for its reviewers or its retry's delay: the end of its run's idle time), rejected (why a
--   rejected attempt ended, for a replayed call).

local L = {}
L.FIELDS = {'steps', 'tool_calls', 'input_tokens', 'output_tokens', 'cost'}
L.KIND_FIELDS = {
  steps = {1}, tool_calls = {2}, tokens = {3, 4}, input_tokens = {3}, output_tokens = {4},
  cost = {5},
}
L.KIND_VIOLATION = {
  steps = 'step_limit', tool_calls = 'tool_call_limit', tokens = 'token_limit',
  input_tokens = 'input_token_limit', output_tokens = 'output_token_limit', cost = 'cost_limit',
}
L.T = {leases = KEYS[1], waiting = KEYS[2], ledger = KEYS[3], meta = KEYS[4], audit = KEYS[5],
  trate = KEYS[6], runs = KEYS[7]}

function L.now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- An integer as text, never in exponent form (Lua 5.1's tostring prints 1e+15 for large ones).
function L.int(n)
  return string.format('%d', math.floor(tonumber(n) or 0))
end

-- -- audit --------------------------------------------------------------------------------------

-- Append one entry to the tenant's chain: it gets the next sequence number and the server time.
-- `fields` maps names to values; empty values are left out. The written fields are collected in
-- `written` (seq, stream id, flat fields) so the caller can seal them with its key.
function L.audit(written, now, fields)
  local seq = redis.call('HINCRBY', L.T.meta, 'audit_seq', 1)
  local flat = {'seq', L.int(seq), 'ts', L.int(now)}
  local names = {}
  for name, value in pairs(fields) do
    if value ~= nil and value ~= '' and value ~= false then names[#names + 1] = name end
  end
  table.sort(names)
  for _, name in ipairs(names) do
    local value = fields[name]
    if type(value) == 'table' then value = cjson.encode(value)
    elseif type(value) == 'number' then
      if value == math.floor(value) then value = L.int(value) else value = tostring(value) end
    end
    flat[#flat + 1] = name
    flat[#flat + 1] = tostring(value)
  end
  local id = redis.call('XADD', L.T.audit, '*', unpack(flat))
  written[#written + 1] = {id, flat}
  return id
end

-- An entry of a task from its request's audit template (tenant, agent, run, task id, action,
-- tier, policy version) plus the entry's own type, decision, reason and detail.
function L.task_entry(written, now, template, kind, decision, reason, detail)
  local fields = {}
  for name, value in pairs(template or {}) do fields[name] = value end
  fields.type = kind
  fields.decision = decision
  fields.reason = reason
  if detail and next(detail) ~= nil then fields.detail = cjson.encode(detail) end
  return L.audit(written, now, fields)
end

-- Seals computed by the caller (HMACs over entries it wrote in earlier calls): one stream entry.
function L.seal(seals_json, by)
  if not seals_json or seals_json == '' or seals_json == '[]' then return end
  redis.call('XADD', L.T.audit, '*', 'type', 'seal', 'by', by, 'seals', seals_json)
end

-- -- usage windows --------------------------------------------------------------------------

-- The usage hash of window w (1 run, 2 day, 3 month) of a request.
function L.window(req, w)
  return req.k.w[w]
end

-- The run window (w = 1) also keeps: started_ms (its first admitted step), alert_at (the cost
-- alert threshold reviewers moved it to, micro-USD), alert_stop (1: reviewers rejected the run at
-- its cost alert), wall_warned (1: its wall-time warning is audited).
local WINDOW_FIELDS = {'steps', 'tool_calls', 'input_tokens', 'output_tokens', 'cost',
  'r_steps', 'r_tool_calls', 'r_input_tokens', 'r_output_tokens', 'r_cost', 'last_ms',
  'discovered', 'started_ms', 'alert_at', 'alert_stop', 'wall_warned'}

function L.window_values(cache, req, w)
  local usage = L.window(req, w)
  if not cache[usage] then
    local raw = redis.call('HMGET', usage, unpack(WINDOW_FIELDS))
    local values = {}
    for i, name in ipairs(WINDOW_FIELDS) do values[name] = tonumber(raw[i] or '0') or 0 end
    values.has_last = raw[11] ~= false
    values.has_started = raw[13] ~= false
    cache[usage] = values
  end
  return cache[usage]
end

-- Give back the reservation a task's record holds (its amounts, in the windows it names).
function L.release(rec)
  local r = redis.call('HMGET', rec, 'resv', 'resv_w')
  if not r[1] then return false end
  local amounts = {}
  for value in string.gmatch(r[1], '[^,]+') do amounts[#amounts + 1] = tonumber(value) end
  for usage in string.gmatch(r[2] or '', '[^|]+') do
    for i = 1, 5 do
      if amounts[i] and amounts[i] ~= 0 then
        redis.call('HINCRBY', usage, 'r_' .. L.FIELDS[i], -amounts[i])
      end
    end
  end
  redis.call('HDEL', rec, 'resv', 'resv_w')
  return true
end

-- Free the leases, and the reservations, of tasks whose holder stopped renewing them (a
-- crashed worker). Leases are members of the leases set by record key; a reclaimed record's
-- reservation goes back to its windows. Returns how many were reclaimed.
function L.reclaim(now)
  local expired = redis.call('ZRANGEBYSCORE', L.T.leases, '-inf', now, 'LIMIT', 0, 256)
  for _, rec in ipairs(expired) do
    redis.call('ZREM', L.T.leases, rec)
    L.release(rec)
  end
  return #expired
end

-- A task that waits again (its earlier holder died) gives back what that holder held.
function L.drop_lease(rec)
  if redis.call('ZREM', L.T.leases, rec) == 1 then L.release(rec) end
end

-- Whether the record's task runs now under a lease that is still alive (a delivery that ends
-- without running, a copy, must leave such a record to the delivery that runs it).
function L.running_live(rec, now)
  if redis.call('HGET', rec, 'where') ~= 'running' then return false end
  local lease = redis.call('ZSCORE', L.T.leases, rec)
  return lease ~= false and tonumber(lease) > now
end

-- The task lets go of all it held or waited for: its lease, its reservation (a hand-off takes
-- both), its place in the wait list, its hand-off token, its booked turn, and when its wait
-- began (a later wait is a new one, with its own max_wait).
function L.let_go(rec)
  L.release(rec)
  redis.call('ZREM', L.T.leases, rec)
  redis.call('ZREM', L.T.waiting, rec)
  redis.call('HDEL', rec, 'req', 'holder', 'handoff', 'turn', 'skip', 'wait_since', 'wait_seq',
    'wait_for')
end

-- The task ends without settling (rejected, denied or shadowed at the worker, a suggestion,
-- rejected or expired by reviewers): it lets go, and its record leaves the ledger (the
-- reconciler no longer publishes it), kept `ttl` seconds.
function L.end_record(rec, now, ttl)
  L.let_go(rec)
  redis.call('HSET', rec, 'where', 'done', 'since', now)
  redis.call('ZREM', L.T.ledger, rec)
  redis.call('EXPIRE', rec, ttl)
end

-- -- rates -----------------------------------------------------------------------------------

-- GCRA: `burst` calls at once, one per `interval` after that. Returns the earliest time (>= t0)
-- a call conforms, and the theoretical arrival time after taking that call.
function L.gcra(tat, rate, t0)
  local interval, burst = rate[1], rate[2]
  local at = math.max(t0, tat + interval - burst * interval)
  return at, math.max(tat, at) + interval
end

-- -- admission -------------------------------------------------------------------------------

-- What admitting `req` now would do, without writing anything. `skip` names the rates already
-- booked for this attempt ("t": tenant, "p": provider); `came` is when this attempt began to
-- wait (default: now), the end of the run's idle time. Returns a verdict:
--   {kind = 'admit' | 'wait' | 'book' | 'reject' | 'alert', v = violation, cur, lim, wait (ms), ci (index of
--    the budget check), turn (ms, for book), tats = {{key, tat, flag}, ...} (admit, book), cv}
-- Order: limits that waiting cannot fix reject (the run's wall time first, as the seed checks
-- it); a run at its cost alert is held for the reviewers ('alert', unless `req.ack` carries their
-- verified approval); otherwise capacity (concurrency, budget held by tasks in flight, runs in
-- flight) makes the task wait in the wait list; otherwise a rate limit or a provider cooldown
-- books its turn; otherwise it is admitted. Leases and reservations of
-- dead holders are reclaimed only when they stand in the way (`reclaim`).
function L.evaluate(req, now, skip, cache, reclaim, came)
  cache = cache or {}
  skip = skip or ''
  local reject, wait
  local est = req.est
  local lr = req.lr or {}
  local first_time = redis.call('HGET', req.k.rec, 'counted') == false

  -- The run's wall time, from its first admitted step, with the policy's grace.
  local wall = req.wall
  if wall and wall ~= cjson.null then
    local run = L.window_values(cache, req, 1)
    if run.has_started and now - run.started_ms > wall[1] + wall[2] then
      reject = {'wall_time_limit', now - run.started_ms, wall[1]}
    end
  end

  -- Long-running limits of the run: these never get better by waiting.
  local depth, max_depth = lr[1] or 0, lr[2] or -1
  if not reject and max_depth >= 0 and depth > max_depth then
    reject = {'discovery_depth_limit', depth, max_depth}
  end
  local max_discovered = lr[3] or -1
  if not reject and first_time and depth > 0 and max_discovered >= 0 then
    local discovered = L.window_values(cache, req, 1).discovered + 1
    if discovered > max_discovered then
      reject = {'discovered_step_limit', discovered, max_discovered}
    end
  end
  -- Idle: from the run's last activity to when this step came (a step that then waited in
  -- line for capacity was not idle time of the run).
  local idle_ms = lr[4] or -1
  if not reject and idle_ms >= 0 and L.window_values(cache, req, 1).has_last then
    local last = L.window_values(cache, req, 1).last_ms
    came = came or now
    if came - last >= idle_ms then
      reject = {'idle_timeout', math.floor((came - last) / 1000), idle_ms / 1000}
    end
  end
  local max_rep = lr[5] or -1
  if not reject and first_time and max_rep >= 0 then
    local seen = tonumber(redis.call('HGET', req.k.steps, lr[6]) or '0') + 1
    if seen > max_rep then reject = {'same_step_loop', seen, max_rep} end
  end

  -- Budgets: used + reserved by tasks in flight + this task's estimate must fit the limit.
  -- Exhausted without the reservations of others: rejected. Over only because of them: wait.
  local function budgets()
    local cv, over, pressed = {}, nil, nil
    for i, check in ipairs(req.checks or {}) do
      local values = L.window_values(cache, req, check[1])
      local kind, limit = check[2], check[3]
      local used, reserved, add = 0, 0, 0
      for _, f in ipairs(L.KIND_FIELDS[kind]) do
        used = used + values[L.FIELDS[f]]
        reserved = reserved + values['r_' .. L.FIELDS[f]]
        add = add + est[f]
      end
      cv[i] = used + reserved + add
      if cv[i] > limit then
        if used + add > limit then
          if not over then over = {L.KIND_VIOLATION[kind], used + add, limit, i} end
        elseif not pressed then
          pressed = {L.KIND_VIOLATION[kind], cv[i], limit, i}
        end
      end
    end
    return cv, over, pressed
  end
  local cv, over, pressed = budgets()
  if pressed and not over and reclaim and L.reclaim(now) > 0 then
    cache = {}
    cv, over, pressed = budgets()
  end
  reject = reject or over
  wait = pressed
  if reject then
    return {kind = 'reject', v = reject[1], cur = reject[2], lim = reject[3], ci = reject[4] or 0,
      cv = cv}
  end

  -- The run's cost alert: at or over it, the task is held for the reviewers, unless it carries
  -- their approval (`req.ack`, verified by the worker); rejected at the alert, the run ends.
  if (req.ca or -1) >= 0 then
    local run = L.window_values(cache, req, 1)
    local threshold = math.max(run.alert_at, req.ca)
    if run.alert_stop > 0 then
      return {kind = 'reject', v = 'cost_alert', cur = run.cost, lim = threshold, ci = 0, cv = cv,
        reason = 'cost alert: reviewers rejected this run at its cost alert; its actions end'}
    end
    if run.cost >= threshold and (req.ack == nil or req.ack == cjson.null) then
      return {kind = 'alert', v = 'cost_alert', cur = run.cost, lim = threshold, cv = cv}
    end
  end

  -- Concurrency: one lease per running task of the tenant.
  if req.conc >= 0 and not redis.call('ZSCORE', L.T.leases, req.k.rec) then
    local running = redis.call('ZCARD', L.T.leases)
    if running >= req.conc and reclaim and L.reclaim(now) > 0 then
      running = redis.call('ZCARD', L.T.leases)
      cache = {}  -- reclaimed reservations changed the windows: read them again if needed
    end
    if running >= req.conc and not wait then
      wait = {'concurrency_limit', running + 1, req.conc, 0}
    end
  end

  -- Runs in flight: a step of a run that is not in flight needs a free run slot. A run is in
  -- flight until its score (its last step + its idle time) passes, or it is closed.
  if not wait and (req.rc or -1) >= 0 then
    local until_ms = tonumber(redis.call('ZSCORE', L.T.runs, req.run) or '0')
    if until_ms <= now then
      local in_flight = redis.call('ZCOUNT', L.T.runs, '(' .. L.int(now), '+inf')
      if in_flight >= req.rc then wait = {'run_concurrency_limit', in_flight + 1, req.rc, 0} end
    end
  end
  if wait then
    return {kind = 'wait', v = wait[1], cur = wait[2], lim = wait[3], ci = wait[4] or 0, cv = cv}
  end

  -- Provider cooldown (a shared Retry-After) and rate limits: the earliest conforming time.
  local turn = now
  local why
  if req.k.cd ~= '' then
    local until_ms = tonumber(redis.call('GET', req.k.cd) or '0')
    if until_ms > turn then turn, why = until_ms, {'cooldown', until_ms - now, 0} end
  end
  local tats = {}
  local function rate(key, spec, flag, scope)
    if not spec or spec == cjson.null or string.find(skip, flag, 1, true) then return end
    local tat = tonumber(redis.call('GET', key) or '0')
    local at = L.gcra(tat, spec, turn)
    tats[#tats + 1] = {key, spec, flag, tat}
    if at > turn then turn, why = at, {'rate_limit:' .. scope, spec[2], spec[2]} end
  end
  rate(L.T.trate, req.tr, 't', 'tenant')
  if req.k.pr ~= '' then rate(req.k.pr, req.pr, 'p', 'provider') end
  -- The deployment's provider, checked before this call (provider_gate.lua): not before `turn`.
  local ext = req.ext
  if ext and ext ~= cjson.null and ext.turn > turn then
    turn, why = ext.turn, {ext.v, ext.wait, 0}
  end
  if turn > now then
    return {kind = 'book', v = why[1], cur = why[2], lim = why[3], wait = turn - now, turn = turn,
      tats = tats, cv = cv}
  end
  return {kind = 'admit', tats = tats, cv = cv, turn = now, cache = cache}
end

-- Take the rate tokens of a verdict at its turn (booking a future turn or admitting now).
function L.take_rates(verdict, now)
  for _, entry in ipairs(verdict.tats or {}) do
    local key, spec, tat = entry[1], entry[2], entry[4]
    local _, new_tat = L.gcra(tat, spec, verdict.turn)
    redis.call('SET', key, L.int(new_tat), 'PX', math.max(1, math.ceil(new_tat - now)) + 1000)
  end
end

-- The rates a verdict booked, as a skip string for the attempt's next arrival.
function L.booked_flags(verdict, skip)
  local flags = skip or ''
  for _, entry in ipairs(verdict.tats or {}) do
    if not string.find(flags, entry[3], 1, true) then flags = flags .. entry[3] end
  end
  return flags
end

-- Commit an admission: the lease, the reservation (recorded in the task's record, counted in
-- the windows that have budgets), the run's step counters and the record. `state` is
-- 'running' (this delivery runs it) or 'handed' (its message is on its way: the slot is kept
-- for it until `lease_exp`).
function L.commit(req, now, verdict, holder, state, lease_exp, ledger_at)
  L.take_rates(verdict, now)
  local rec = req.k.rec
  redis.call('ZADD', L.T.leases, lease_exp, rec)
  local released = L.release(rec)
  local est = req.est
  local reserves = next(req.rw or {}) ~= nil and (est[1] ~= 0 or est[2] ~= 0 or est[3] ~= 0
    or est[4] ~= 0 or est[5] ~= 0)
  local in_window = {}
  if reserves then for _, w in ipairs(req.rw) do in_window[w] = true end end
  -- The windows as evaluate read them, unless a stale reservation was just given back.
  local cache = (not released and verdict.cache) or {}
  local reserved = {}
  for w = 1, 3 do
    local usage = L.window(req, w)
    local known = cache[usage]
    local writes = {}
    if in_window[w] then
      for i = 1, 5 do
        if est[i] ~= 0 then
          if known then
            -- Read by this call moments ago: written once, not incremented field by field.
            writes[#writes + 1] = 'r_' .. L.FIELDS[i]
            writes[#writes + 1] = L.int(known['r_' .. L.FIELDS[i]] + est[i])
          else
            redis.call('HINCRBY', usage, 'r_' .. L.FIELDS[i], est[i])
          end
        end
      end
      reserved[#reserved + 1] = usage
    end
    if w == 1 then
      writes[#writes + 1] = 'last_ms'
      writes[#writes + 1] = L.int(now)
      if known and not known.has_started then
        writes[#writes + 1] = 'started_ms'
        writes[#writes + 1] = L.int(now)
      elseif not known then
        redis.call('HSETNX', usage, 'started_ms', now)
      end
    end
    if #writes > 0 then redis.call('HSET', usage, unpack(writes)) end
  end
  local run_usage = L.window(req, 1)
  if (req.rc or -1) >= 0 then
    redis.call('ZREMRANGEBYSCORE', L.T.runs, '-inf', now)
    redis.call('ZADD', L.T.runs, now + req.ri, req.run)
  end
  if req.ack and req.ack ~= cjson.null and (req.ca or -1) >= 0 then
    -- The reviewers' approval at the cost alert: the run goes on up to the threshold they set,
    -- or the policy's next step (the next multiple of the alert above the cost so far).
    local to = req.ack
    if to <= 0 then
      local cost = tonumber(redis.call('HGET', run_usage, 'cost') or '0')
      if req.ca > 0 then to = (math.floor(cost / req.ca) + 1) * req.ca else to = cost + 1 end
    end
    if to > tonumber(redis.call('HGET', run_usage, 'alert_at') or '0') then
      redis.call('HSET', run_usage, 'alert_at', L.int(to))
    end
  end
  local fields = {'id', req.id, 'attempt', req.a, 'holder', holder, 'where', state, 'since', now,
    'lease_exp', lease_exp}
  if #reserved > 0 then
    fields[#fields + 1] = 'resv'
    fields[#fields + 1] = table.concat({L.int(est[1]), L.int(est[2]), L.int(est[3]),
      L.int(est[4]), L.int(est[5])}, ',')
    fields[#fields + 1] = 'resv_w'
    fields[#fields + 1] = table.concat(reserved, '|')
  end
  if redis.call('HGET', rec, 'counted') == false then
    fields[#fields + 1] = 'counted'
    fields[#fields + 1] = 1
    local lr = req.lr or {}
    local depth = lr[1] or 0
    if depth > 0 then
      redis.call('HINCRBY', run_usage, 'discovered', 1)
      local deepest = tonumber(redis.call('HGET', run_usage, 'max_depth') or '0')
      if depth > deepest then redis.call('HSET', run_usage, 'max_depth', depth) end
    end
    if (lr[5] or -1) >= 0 and lr[6] then
      redis.call('HINCRBY', req.k.steps, lr[6], 1)
      redis.call('EXPIRE', req.k.steps, req.ttl[1])
    end
  end
  redis.call('HSET', rec, unpack(fields))
  redis.call('HDEL', rec, 'settled', 'turn', 'skip', 'req', 'fail', 'paused_since')
  redis.call('ZADD', L.T.ledger, ledger_at, rec)
end

-- Put a task at the tail of the wait list (or back at its old place) until capacity frees.
-- Returns true the first time this attempt waits (that is what the audit records).
function L.enqueue(req, raw, now, verdict)
  local rec = req.k.rec
  local seq = redis.call('HGET', rec, 'wait_seq')
  local attempt = redis.call('HGET', rec, 'attempt')
  if not seq or attempt ~= tostring(req.a) then
    seq = redis.call('HINCRBY', L.T.meta, 'wait_seq', 1)
  end
  local first = redis.call('HGET', rec, 'wait_since') == false or attempt ~= tostring(req.a)
  if first then redis.call('HSET', rec, 'wait_since', now) end
  local since = tonumber(redis.call('HGET', rec, 'wait_since'))
  redis.call('ZADD', L.T.waiting, seq, rec)
  L.drop_lease(rec)
  redis.call('HSET', rec, 'id', req.id, 'attempt', req.a, 'where', 'waiting', 'since', now,
    'wait_seq', seq, 'wait_for', verdict.v, 'req', raw)
  redis.call('HDEL', rec, 'settled', 'holder', 'handoff')
  redis.call('ZADD', L.T.ledger, since + req.max_wait, rec)
  return first, since
end

-- Book a future turn: the rate tokens are taken now for that time, so N waiting tasks come back
-- spaced at the permitted rate. A turn within the countdown limit is published with a countdown
-- (queued); a later one is parked (the reconciler publishes it when due).
function L.book(req, now, verdict, G)
  local rec = req.k.rec
  L.take_rates(verdict, now)
  local skip = L.booked_flags(verdict, redis.call('HGET', rec, 'skip') or '')
  local first = redis.call('HGET', rec, 'wait_since') == false
    or redis.call('HGET', rec, 'attempt') ~= tostring(req.a)
  if first then redis.call('HSET', rec, 'wait_since', now) end
  local parked = verdict.turn - now > G.cdl
  local where = parked and 'parked' or 'queued'
  L.drop_lease(rec)
  redis.call('HSET', rec, 'id', req.id, 'attempt', req.a, 'where', where, 'since', now,
    'turn', verdict.turn, 'skip', skip, 'wait_for', verdict.v)
  redis.call('HDEL', rec, 'settled', 'holder', 'handoff', 'req')
  redis.call('ZADD', L.T.ledger, parked and verdict.turn or verdict.turn + G.grace, rec)
  return first, parked
end

-- The record's task is published again by the caller: queued in the ledger, looked at again
-- after `grace` if no worker received it by then.
function L.requeue(rec, now, G)
  redis.call('HSET', rec, 'where', 'queued', 'since', now)
  redis.call('ZADD', L.T.ledger, now + G.grace, rec)
end

-- Hand capacity to the oldest waiting tasks that fit: each is admitted on its behalf (its slot
-- and reservation taken now) and returned (in out.pub) with a hand-off token for the caller to
-- publish; `out.written` collects audit entries. `pv` is the caller's policy version: a request
-- stored under another one (a reload since it began to wait) carries that policy's limits, so
-- it is published without a token instead, and its own delivery decides under the current one.
-- A waiting task that now needs a turn (rate, cooldown) or that can no longer fit (its budget
-- was spent meanwhile) is published too, so its own delivery books or ends it. Stops at the
-- first task that needs a concurrency slot and finds none (no later one could have it either),
-- after `scan` tasks that wait for budget held in flight, or after `limit` tasks moved on.
function L.handoff(now, G, out, pv)
  local cache = {}
  local skipped, handled, start, looked = 0, 0, 0, 0
  -- Once a step waits for a run slot, every run slot is taken: steps of runs that are not in
  -- flight are passed over without counting (one run's fan-out must not hide the steps of runs
  -- in flight behind it), within a bound on what one call looks at.
  local runs_full = false
  while skipped < G.scan and handled < G.limit and looked < G.scan * 16 do
    local rec = redis.call('ZRANGE', L.T.waiting, start, start)[1]
    if not rec then break end
    looked = looked + 1
    local raw = redis.call('HGET', rec, 'req')
    local msg = redis.call('HGET', rec, 'msg')
    if not raw or not msg then
      -- Nothing to admit or publish it from (a message that claimed to be in the ledger but is
      -- not): it leaves the wait list, recorded as lost rather than holding a slot forever.
      redis.call('ZREM', L.T.waiting, rec)
      redis.call('ZREM', L.T.ledger, rec)
      redis.call('HSET', rec, 'where', 'done')
      L.audit(out.written, now, {type = 'task_lost', task_id = redis.call('HGET', rec, 'id') or '',
        reason = 'waiting task without a message in the ledger: it cannot be published'})
    else
      local req = cjson.decode(raw)
      local needs_run_slot = runs_full and (req.rc or -1) >= 0
        and tonumber(redis.call('ZSCORE', L.T.runs, req.run) or '0') <= now
      local stored_pv = req.au and req.au.policy_version
      local reloaded = pv and stored_pv and stored_pv ~= pv
      local r = redis.call('HMGET', rec, 'skip', 'wait_since', 'paused_since')
      local came = tonumber(r[2] or now)
      if r[3] then came = math.min(came, tonumber(r[3])) end
      local verdict
      if needs_run_slot then
        verdict = {kind = 'pass'}
      elseif reloaded then
        verdict = {kind = 'reloaded'}
      else
        verdict = L.evaluate(req, now, r[1], cache, G.reclaim == 1, came)
      end
      local stale = req.wend and now >= req.wend
      if stale and verdict.kind == 'admit' then
        -- It began to wait on an earlier day: its request names that day's (and month's) usage
        -- windows, which today's spending never reaches. Its own delivery decides, against
        -- today's windows; the slot stays free for it (nobody behind it is handed it first).
        redis.call('ZREM', L.T.waiting, rec)
        L.requeue(rec, now, G)
        redis.call('HDEL', rec, 'req')
        out.pub[#out.pub + 1] = {id = req.id, msg = msg}
        break
      elseif verdict.kind == 'pass' then
        start = start + 1
      elseif verdict.kind == 'wait' then
        if verdict.v == 'concurrency_limit' then break end
        -- It needs budget held by tasks in flight, or a run slot: a later task (of another
        -- run, or of a run in flight) may still fit.
        if verdict.v == 'run_concurrency_limit' then runs_full = true end
        skipped = skipped + 1
        start = start + 1
      else
        handled = handled + 1
        redis.call('ZREM', L.T.waiting, rec)
        if verdict.kind == 'admit' then
          local n = redis.call('HINCRBY', rec, 'handoffs', 1)
          local token = req.id .. ':' .. req.a .. ':' .. n
          local since = tonumber(redis.call('HGET', rec, 'wait_since') or now)
          local lease_exp = math.max(since + req.max_wait, now + G.lease)
          L.commit(req, now, verdict, token, 'handed', lease_exp, now + G.grace)
          redis.call('HSET', rec, 'handoff', token, 'msg', msg)
          out.pub[#out.pub + 1] = {id = req.id, msg = msg, token = token}
          cache = {}
        else
          -- Its own delivery decides (books its turn, or ends it with the reason): a task
          -- always ends on a worker, with its result.
          L.requeue(rec, now, G)
          redis.call('HDEL', rec, 'req')
          out.pub[#out.pub + 1] = {id = req.id, msg = msg}
        end
      end
    end
  end
end

-- "<type> exceeded: <current> / <limit> (<pct>%)", as the policy layer words it; cost figures
-- (micro-USD in Redis) print as dollars.
function L.violation_text(v, cur, lim)
  local function amount(x)
    if v == 'cost_limit' then return string.format('$%.2f', x / 1000000) end
    if x == math.floor(x) then return L.int(x) end
    return tostring(x)
  end
  local pct
  if lim == 0 then pct = 'limit is 0' else pct = L.int(math.floor(cur * 100 / lim)) .. '%' end
  return string.format('%s exceeded: %s / %s (%s)', v, amount(cur), amount(lim), pct)
end

-- The audit template and the violation detail of a verdict.
function L.violation_detail(verdict)
  local detail = {violation = verdict.v, current = verdict.cur, limit = verdict.lim}
  if verdict.turn and verdict.kind == 'book' then detail.turn_ms = verdict.turn end
  return detail
end

