-- lib.lua: the functions the admission, settlement, sweep and held scripts share. It is prepended
-- to each of those scripts when they are loaded (governance/store/lua.py), so each script stays
-- one atomic call, and the rules below exist once. The names `F.<field>` (this script's
-- argument positions), `R.<field>` (the admission request's), `AT.<type>` (audit entry types)
-- and `V.<violation>` are constants, replaced when the script is loaded; before this library
-- comes the generated prelude: `read_request`, `read_settings`, the usage fields `USAGE`, the
-- audit template's fields `TEMPLATE`, and the limit kinds: `PHASES` (in order), `LIMITS[phase]`
-- (the kinds of each phase, in order), `VIOLATION[kind]` and `HANDOFF[kind]` (see
-- governance/store/vocabulary.py).
--
-- Every script that uses this library receives the tenant's shared keys first:
--   KEYS[1] leases      ZSET  record key -> lease expiry (ms): a member per running (or handed) task
--   KEYS[2] waiting     ZSET  record key -> wait position: the tenant's FIFO wait list
--   KEYS[3] ledger      ZSET  record key -> when the reconciler must look at the task again (ms)
--   KEYS[4] meta        HASH  wait_seq, audit_seq, busy:<minute> (counters of the tenant), and
--                             what operators set (ctl_paused, ctl_concurrency[_until],
--                             ctl_weight[_until]: keys.CONTROL_FIELDS)
--   KEYS[5] audit       STREAM the tenant's audit chain (entries and seals)
--   KEYS[6] tenant rate STRING GCRA theoretical arrival time (ms)
--   KEYS[7] runs        ZSET  run id -> when the run stops being in flight (ms)
--
-- A task's own keys (its record, its usage windows, its provider's cooldown and rate) are passed
-- in KEYS by the script that admits it (and kept with its request, `req.k`, while it waits). A task
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
L.T = {leases = KEYS[1], waiting = KEYS[2], ledger = KEYS[3], meta = KEYS[4], audit = KEYS[5],
  trate = KEYS[6], runs = KEYS[7]}
-- The tenant's tasks published to the broker and not yet received (keys.TenantKeys.queued, which
-- the publisher counts against its concurrency): in the same slot, named after its leases.
L.T.queued = (string.gsub(KEYS[1], ':leases$', ':queued'))

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

-- The audit template of a request (the fields every entry about its task shares: `TEMPLATE`):
-- where they are, its arguments `a` after position `at` (`R.au`, `F.au`). They are read when an
-- entry is written, never copied into a table of their own.
function L.template(a, at)
  return {a, at}
end

-- An entry of a task: its type, decision, reason and detail (a table, or JSON text as the caller
-- sent it), then its request's audit template (tenant, agent, run, task id, action, tier, policy
-- version, reviewer). Empty values are left out. The fields go in this fixed order: a seal
-- covers the fields whatever their order (audit_seal.canonical_fields), so none are sorted.
-- `written` gets the entry without its template, flagged (`{id, flat, 1}`): the caller sent
-- the template, and adds it back (audit_seal.parse_written), so the reply does not carry it.
function L.task_entry(written, now, template, kind, decision, reason, detail)
  local seq = redis.call('HINCRBY', L.T.meta, 'audit_seq', 1)
  local flat = {'seq', L.int(seq), 'ts', L.int(now), 'type', kind}
  local n = 6
  if decision and decision ~= '' then
    flat[n + 1], flat[n + 2], n = 'decision', decision, n + 2
  end
  if reason and reason ~= '' then flat[n + 1], flat[n + 2], n = 'reason', reason, n + 2 end
  if type(detail) == 'table' then
    if next(detail) ~= nil then
      flat[n + 1], flat[n + 2], n = 'detail', cjson.encode(detail), n + 2
    end
  elseif detail and detail ~= '' and detail ~= '{}' then
    flat[n + 1], flat[n + 2], n = 'detail', detail, n + 2
  end
  local own = n
  local a, at = template[1], template[2]
  for i = 1, #TEMPLATE do
    local value = a[at + i]
    if value and value ~= '' then flat[n + 1], flat[n + 2], n = TEMPLATE[i], value, n + 2 end
  end
  local id = redis.call('XADD', L.T.audit, '*', unpack(flat))
  for i = n, own + 1, -1 do flat[i] = nil end
  written[#written + 1] = {id, flat, 1}
  return id
end

-- Seals computed by the caller (HMACs over entries it wrote in earlier calls): one stream entry.
function L.seal(seals_json, by)
  if not seals_json or seals_json == '' or seals_json == '[]' then return end
  redis.call('XADD', L.T.audit, '*', 'type', AT.seal, 'by', by, 'seals', seals_json)
end

-- -- usage windows --------------------------------------------------------------------------

-- The usage hash of window w (1 run, 2 day, 3 month) of a request.
function L.window(req, w)
  return req.k.w[w]
end

-- The run window (w = 1) also keeps: started_ms (its first admitted step), alert_at (the cost
-- alert threshold reviewers moved it to, micro-USD), alert_stop (1: reviewers rejected the run at
-- its cost alert), wall_warned (1: its wall-time warning is audited).
-- `WINDOW_FIELDS` (generated): each usage field (what was used), each `r_<field>` (what tasks
-- in flight reserved), then last_ms, discovered, started_ms, alert_at, alert_stop, wall_warned;
-- `read_window(key)` (generated) reads them all into one table, by name.

function L.window_values(cache, req, w)
  local usage = L.window(req, w)
  local values = cache[usage]
  if not values then
    values = read_window(usage)
    cache[usage] = values
  end
  return values
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
        redis.call('HINCRBY', usage, WINDOW_FIELDS[#USAGE + i], -amounts[i])
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

-- Whether the request's task was never counted yet (its first admission: its step counts in
-- the run's discovered steps and repetitions). `req.counted`: the caller read it in this call.
function L.first_time(req)
  if req.counted == nil then req.counted = redis.call('HGET', req.k.rec, 'counted') ~= false end
  return not req.counted
end

-- The task lets go of all it held or waited for: its lease, its reservation (a hand-off takes
-- both), its place in the wait list or among the tasks in the broker (a task that ends without
-- an admission, denied or shadowed at the worker, must not count against its tenant's
-- concurrency until that count's horizon), its hand-off token, its booked turn, and when its
-- wait began (a later wait is a new one, with its own max_wait).
function L.let_go(rec)
  L.release(rec)
  redis.call('ZREM', L.T.leases, rec)
  redis.call('ZREM', L.T.waiting, rec)
  redis.call('ZREM', L.T.queued, rec)
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

-- -- violations ------------------------------------------------------------------------------

-- "<type> exceeded: <current> / <limit> (<pct>%)", as the policy layer words it; cost figures
-- (micro-USD in Redis) print as dollars.
function L.violation_text(v, cur, lim)
  local function amount(x)
    if v == V.cost_limit then return string.format('$%.2f', x / 1000000) end
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

-- -- admission, the wait list, the hand-off ---------------------------------------------------

-- What follows is defined by L.load_admission() when a call first needs it: Redis runs the whole
-- text of a script with every call, each function defined is work, and a settlement that finds
-- no task waiting, an admission that does not wait, the held-store and audit scripts need only
-- part of it, or none.
local PHASES, LIMITS, VIOLATION, HANDOFF  -- the limit kinds, once loaded

local function define_admission()
  PHASES, LIMITS, VIOLATION, HANDOFF = limit_kinds()

  -- -- rates -----------------------------------------------------------------------------------

  -- GCRA: `burst` calls at once, one per `interval` after that. Returns the earliest time (>= t0)
  -- a call conforms, and the theoretical arrival time after taking that call.
  function L.gcra(tat, interval, burst, t0)
    local at = math.max(t0, tat + interval - burst * interval)
    return at, math.max(tat, at) + interval
  end

  -- -- admission -------------------------------------------------------------------------------

  -- The check of each limit kind, by name (the kinds, their order and their phases are declared
  -- in LIMIT_KINDS, governance/store/vocabulary.py, and come here as `LIMITS`). A check takes the
  -- evaluation `x` (req, now, skip, cache, reclaim, came, first_time; `turn` and `tats` in the
  -- book phase) and returns nil when its limit does not stand in the way, else what it found:
  --   reject, hold, wait: {current, limit[, v = violation (default: the kind's)][, ci = index of
  --     the budget check][, reason][, kind = a phase other than its own]}
  --   book: {current, limit, turn = the earliest time it allows (ms, later than x.turn)[, v]}
  local C = {}

  -- The run's wall time, from its first admitted step, with the policy's grace.
  function C.wall_time(x)
    local limit = x.req[R.wall_time_ms]
    if not limit then return nil end
    local run = L.window_values(x.cache, x.req, 1)
    if run.has_started and x.now - run.started_ms > limit + x.req[R.wall_time_grace_ms] then
      return {x.now - run.started_ms, limit}
    end
  end

  -- Long-running limits of the run: these never get better by waiting.
  function C.discovery_depth(x)
    local depth, max_depth = x.req[R.depth] or 0, x.req[R.max_depth]
    if max_depth and depth > max_depth then return {depth, max_depth} end
  end

  function C.discovered_steps(x)
    local depth, max_discovered = x.req[R.depth] or 0, x.req[R.max_discovered]
    if x.first_time and depth > 0 and max_discovered then
      local discovered = L.window_values(x.cache, x.req, 1).discovered + 1
      if discovered > max_discovered then return {discovered, max_discovered} end
    end
  end

  -- Idle: from the run's last activity to when this step came (a step that then waited in line
  -- for capacity was not idle time of the run).
  function C.idle(x)
    local idle_ms = x.req[R.idle_ms]
    if idle_ms and L.window_values(x.cache, x.req, 1).has_last then
      local last = L.window_values(x.cache, x.req, 1).last_ms
      if x.came - last >= idle_ms then
        return {math.floor((x.came - last) / 1000), idle_ms / 1000}
      end
    end
  end

  function C.same_step(x)
    local max_repetitions = x.req[R.max_repetitions]
    if x.first_time and max_repetitions then
      local seen = tonumber(redis.call('HGET', x.req.k.steps, x.req[R.step]) or '0') + 1
      if seen > max_repetitions then return {seen, max_repetitions} end
    end
  end

  -- Budgets: used + reserved by tasks in flight + this task's estimate must fit the limit.
  -- Exhausted without the reservations of others: rejected (budget). Over only because of them:
  -- the task waits (budget_in_flight). Measured once per evaluation, whichever limit decides: the
  -- figures (`cv`, one per check) go back with every verdict.
  function L.measure(x)
    local req = x.req
    local function budgets()
      local cv, over, pressed = {}, nil, nil
      -- A check: {window, limit, first and last usage field it sums, violation}.
      for i, check in ipairs(req[R.checks] or {}) do
        local values = L.window_values(x.cache, req, check[1])
        local limit = check[2]
        local used, reserved, add = 0, 0, 0
        for f = check[3], check[4] do
          used = used + values[USAGE[f]]
          reserved = reserved + values[WINDOW_FIELDS[#USAGE + f]]
          add = add + req[R.est + f]
        end
        cv[i] = used + reserved + add
        if cv[i] > limit then
          if used + add > limit then
            if not over then over = {used + add, limit, v = check[5], ci = i} end
          elseif not pressed then
            pressed = {cv[i], limit, v = check[5], ci = i}
          end
        end
      end
      return cv, over, pressed
    end
    local cv, over, pressed = budgets()
    if pressed and not over and x.reclaim and L.reclaim(x.now) > 0 then
      x.cache = {}
      cv, over, pressed = budgets()
    end
    x.cv, x.over, x.pressed = cv, over, pressed
  end

  function C.budget(x)
    if not x.cv then L.measure(x) end
    return x.over
  end

  function C.budget_in_flight(x)
    return x.pressed
  end

  -- The run's cost alert: at or over it, the task is held for the reviewers, unless it carries
  -- their approval (`cost_alert_ack`, verified by the worker); rejected at the alert, the run ends.
  function C.cost_alert(x)
    local alert = x.req[R.cost_alert]
    if not alert then return nil end
    local run = L.window_values(x.cache, x.req, 1)
    local threshold = math.max(run.alert_at, alert)
    if run.alert_stop > 0 then
      return {run.cost, threshold, kind = 'reject',
        reason = 'cost alert: reviewers rejected this run at its cost alert; its actions end'}
    end
    if run.cost >= threshold and not x.req[R.cost_alert_ack] then return {run.cost, threshold} end
  end

  -- What operators set on the tenant now (read by every evaluation, never cached: a pause or an
  -- override takes effect at the next call): paused, and the concurrency in force.
  function L.control(x)
    if not x.control then
      local c = redis.call('HMGET', L.T.meta, 'ctl_paused', 'ctl_concurrency',
        'ctl_concurrency_until')
      x.control = {paused = c[1] == '1', concurrency = x.req[R.concurrency]}
      if c[2] and tonumber(c[3] or '0') > x.now then x.control.concurrency = tonumber(c[2]) end
    end
    return x.control
  end

  -- Paused by an operator: nothing of the tenant starts; its tasks wait (and keep their place).
  function C.paused(x)
    if L.control(x).paused then return {1, 0} end
  end

  -- Concurrency: one lease per running task of the tenant (an operator's override, while it
  -- lasts, in place of the policy's).
  function C.concurrency(x)
    local limit = L.control(x).concurrency
    if not limit or redis.call('ZSCORE', L.T.leases, x.req.k.rec) then return nil end
    -- At publication and at a hand-off, the tasks already in the broker, on their way to a
    -- slot, count too (they were published first: first come, first served; a hand-off that did
    -- not count them sent up to twice the concurrency to the broker, and a task published
    -- earlier then found its slot taken and waited again). A delivered task's own admission
    -- counts what runs: it is no longer in the broker, and those still there come after it.
    local queued = 0
    if x.req[R.at_publish] then
      queued = redis.call('ZCARD', L.T.queued)
    elseif L.waiting_since then
      -- Handing on a task that began to wait at `L.waiting_since`: only those published before
      -- then are ahead of it (a later one waits behind it when it arrives).
      queued = redis.call('ZCOUNT', L.T.queued, '-inf', L.waiting_since)
    end
    local running = redis.call('ZCARD', L.T.leases) + queued
    if running >= limit and x.reclaim and L.reclaim(x.now) > 0 then
      running = redis.call('ZCARD', L.T.leases) + queued
      x.cache = {}  -- reclaimed reservations changed the windows: read them again if needed
    end
    if running >= limit then return {running + 1, limit} end
  end

  -- Runs in flight: a step of a run that is not in flight needs a free run slot. A run is in
  -- flight until its score (its last step + its idle time) passes, or it is closed.
  function C.run_concurrency(x)
    local limit = x.req[R.run_concurrency]
    if not limit then return nil end
    if tonumber(redis.call('ZSCORE', L.T.runs, x.req[R.run]) or '0') <= x.now then
      local in_flight = redis.call('ZCOUNT', L.T.runs, '(' .. L.int(x.now), '+inf')
      if in_flight >= limit then return {in_flight + 1, limit} end
    end
  end

  -- Provider cooldown (a shared Retry-After) and rate limits: the earliest conforming time. Rates
  -- already booked for this attempt (`skip`: "t" tenant, "p" provider) are not taken again.
  function C.cooldown(x)
    if x.req.k.cd == '' then return nil end
    local until_ms = tonumber(redis.call('GET', x.req.k.cd) or '0')
    if until_ms > x.turn then return {until_ms - x.now, 0, turn = until_ms} end
  end

  local function rate(x, key, interval, burst, flag, scope)
    if not interval or string.find(x.skip, flag, 1, true) then return nil end
    local tat = tonumber(redis.call('GET', key) or '0')
    local at = L.gcra(tat, interval, burst, x.turn)
    x.tats[#x.tats + 1] = {key, interval, burst, flag, tat}
    if at > x.turn then return {burst, burst, turn = at, v = 'rate_limit:' .. scope} end
  end

  function C.tenant_rate(x)
    return rate(x, L.T.trate, x.req[R.tenant_rate_interval_ms], x.req[R.tenant_rate_burst], 't',
      'tenant')
  end

  function C.provider_rate(x)
    if x.req.k.pr == '' then return nil end
    return rate(x, x.req.k.pr, x.req[R.provider_rate_interval_ms], x.req[R.provider_rate_burst],
      'p', 'provider')
  end

  -- The deployment's provider, checked before this call (provider_gate.lua): not before its turn.
  function C.provider_gate(x)
    local turn = x.req[R.gate_turn]
    if turn and turn > x.turn then
      return {x.req[R.gate_wait], 0, turn = turn, v = x.req[R.gate_violation]}
    end
  end

  -- Which kind of a phase decides: in reject, hold and wait the first kind hit (in its phase's
  -- order); in book every kind may move the turn later, and the latest turn decides.
  local function first_hit(x, phase)
    for _, name in ipairs(LIMITS[phase]) do
      local hit = C[name](x)
      if hit then return name, hit end
    end
  end

  local function latest_turn(x)
    x.turn, x.tats = x.now, {}
    local name, hit
    for _, kind in ipairs(LIMITS.book) do
      local moved = C[kind](x)
      if moved then x.turn, name, hit = moved.turn, kind, moved end
    end
    return name, hit
  end

  local DECIDE = {reject = first_hit, hold = first_hit, wait = first_hit, book = latest_turn}

  -- What admitting `req` now would do, without writing anything. `skip` names the rates already
  -- booked for this attempt ("t": tenant, "p": provider); `came` is when this attempt began to
  -- wait (default: now), the end of the run's idle time. The phases go in their order (`PHASES`:
  -- limits that waiting cannot fix reject; a run at its cost alert is held for the reviewers;
  -- capacity makes the task wait in the wait list; a rate limit or a cooldown books its turn);
  -- nothing hit: admitted. Leases and reservations of dead holders are reclaimed only when they
  -- stand in the way (`reclaim`). Returns a verdict:
  --   {kind = 'admit' | 'reject' | 'hold' | 'wait' | 'book', limit = the kind that decided,
  --    v = violation, cur, lim, ci (index of the budget check, or 0), reason, cv (the budgets'
  --    figures), wait (ms, book), turn (ms: now, or the booked turn), tats (the rates to take,
  --    admit and book: {{key, interval, burst, flag, tat}, ...}), cache (admit)}
  function L.evaluate(req, now, skip, cache, reclaim, came)
    local x = {req = req, now = now, skip = skip or '', cache = cache or {}, reclaim = reclaim,
      came = came or now, first_time = L.first_time(req)}
    for _, phase in ipairs(PHASES) do
      local name, hit = DECIDE[phase](x, phase)
      if name then
        if not x.cv then L.measure(x) end
        local verdict = {kind = hit.kind or phase, limit = name, v = hit.v or VIOLATION[name],
          cur = hit[1], lim = hit[2], ci = hit.ci or 0, reason = hit.reason, cv = x.cv}
        if phase == 'book' then
          verdict.turn, verdict.wait, verdict.tats = hit.turn, hit.turn - now, x.tats
        end
        return verdict
      end
    end
    return {kind = 'admit', tats = x.tats, cv = x.cv, turn = now, cache = x.cache}
  end

  -- Take the rate tokens of a verdict at its turn (booking a future turn or admitting now).
  function L.take_rates(verdict, now)
    for _, entry in ipairs(verdict.tats or {}) do
      local key, interval, burst, tat = entry[1], entry[2], entry[3], entry[5]
      local _, new_tat = L.gcra(tat, interval, burst, verdict.turn)
      redis.call('SET', key, L.int(new_tat), 'PX', math.max(1, math.ceil(new_tat - now)) + 1000)
    end
  end

  -- Commit an admission: the lease, the reservation (recorded in the task's record, counted in
  -- the windows that have budgets), the run's step counters and the record. `state` is
  -- 'running' (this delivery runs it) or 'handed' (its message is on its way: the slot is kept
  -- for it until `lease_exp`).
  function L.commit(req, now, verdict, holder, state, lease_exp, ledger_at)
    L.take_rates(verdict, now)
    local rec = req.k.rec
    redis.call('ZADD', L.T.leases, lease_exp, rec)
    -- (`req.no_resv`: the caller read the record in this call and found no reservation.)
    local released = not req.no_resv and L.release(rec)
    local est = {}
    for i = 1, #USAGE do est[i] = req[R.est + i] end
    local in_window, budgeted = {}, false
    for w = 1, 3 do
      if req[R.reserve + w] then in_window[w], budgeted = true, true end
    end
    local reserves = budgeted and (est[1] ~= 0 or est[2] ~= 0 or est[3] ~= 0 or est[4] ~= 0
      or est[5] ~= 0)
    if not reserves then in_window = {} end
    -- The windows as evaluate read them, unless a stale reservation was just given back.
    local cache = (not released and verdict.cache) or {}
    local reserved = {}
    for w = 1, 3 do
      local usage = L.window(req, w)
      local known = cache[usage]
      local writes = {}
      if in_window[w] then
        for i = 1, #USAGE do
          if est[i] ~= 0 then
            if known then
              -- Read by this call moments ago: written once, not incremented field by field.
              writes[#writes + 1] = WINDOW_FIELDS[#USAGE + i]
              writes[#writes + 1] = L.int(known[WINDOW_FIELDS[#USAGE + i]] + est[i])
            else
              redis.call('HINCRBY', usage, WINDOW_FIELDS[#USAGE + i], est[i])
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
    if req[R.run_concurrency] then
      redis.call('ZREMRANGEBYSCORE', L.T.runs, '-inf', now)
      redis.call('ZADD', L.T.runs, now + req[R.run_idle_ms], req[R.run])
    end
    local ack, alert = req[R.cost_alert_ack], req[R.cost_alert]
    if ack and alert then
      -- The reviewers' approval at the cost alert: the run goes on up to the threshold they set,
      -- or the policy's next step (the next multiple of the alert above the cost so far).
      local to = ack
      if to <= 0 then
        local cost = tonumber(redis.call('HGET', run_usage, 'cost') or '0')
        if alert > 0 then to = (math.floor(cost / alert) + 1) * alert else to = cost + 1 end
      end
      if to > tonumber(redis.call('HGET', run_usage, 'alert_at') or '0') then
        redis.call('HSET', run_usage, 'alert_at', L.int(to))
      end
    end
    local fields = {'id', req[R.id], 'attempt', req[R.attempt], 'holder', holder, 'where', state,
      'since', now, 'lease_exp', lease_exp}
    if #reserved > 0 then
      fields[#fields + 1] = 'resv'
      fields[#fields + 1] = table.concat({L.int(est[1]), L.int(est[2]), L.int(est[3]),
        L.int(est[4]), L.int(est[5])}, ',')
      fields[#fields + 1] = 'resv_w'
      fields[#fields + 1] = table.concat(reserved, '|')
    end
    if L.first_time(req) then
      fields[#fields + 1] = 'counted'
      fields[#fields + 1] = 1
      local depth = req[R.depth] or 0
      if depth > 0 then
        redis.call('HINCRBY', run_usage, 'discovered', 1)
        local deepest = tonumber(redis.call('HGET', run_usage, 'max_depth') or '0')
        if depth > deepest then redis.call('HSET', run_usage, 'max_depth', depth) end
      end
      if req[R.max_repetitions] and req[R.step] then
        redis.call('HINCRBY', req.k.steps, req[R.step], 1)
        redis.call('EXPIRE', req.k.steps, req[R.ttl_run])
      end
    end
    redis.call('HSET', rec, unpack(fields))
    redis.call('HDEL', rec, 'settled', 'turn', 'skip', 'req', 'fail', 'paused_since')
    redis.call('ZADD', L.T.ledger, ledger_at, rec)
  end

end

local function define_wait_list()
  -- The rates a verdict booked, as a skip string for the attempt's next arrival.
  function L.booked_flags(verdict, skip)
    local flags = skip or ''
    for _, entry in ipairs(verdict.tats or {}) do
      if not string.find(flags, entry[4], 1, true) then flags = flags .. entry[4] end
    end
    return flags
  end

  -- For a limit whose hand-off effect is 'pass', once the hand-off found it full: whether a
  -- waiting request needs what is full (it is passed over without being evaluated).
  L.needs = {}
  function L.needs.run_concurrency(req, now)
    return req[R.run_concurrency] ~= nil
      and tonumber(redis.call('ZSCORE', L.T.runs, req[R.run]) or '0') <= now
  end

  -- The request a waiting task keeps in its record (`req`): admit.lua's arguments that make up
  -- the admission request (without the envelope, which the record keeps as `msg`) and its keys.
  function L.kept_request(argv, keys)
    local args = {}
    for i = 1, R_SIZE do args[i] = argv[i] end
    args[R.envelope] = ''
    -- How this call was made (at publication, in a saturated pool) is not the waiting task's.
    args[R.at_publish], args[R.pool_wait], args[R.pool_gated] = '', '', ''
    return cjson.encode({args = args, keys = keys})
  end

  -- The request a record keeps, read as admit.lua reads its arguments (`req.k`: its keys). A
  -- request kept by an earlier version (one JSON object, no `args`) reads as nil, and as itself:
  -- the hand-off publishes such a task for its own delivery to decide.
  function L.stored_request(raw)
    local stored = cjson.decode(raw)
    if type(stored.args) ~= 'table' then return nil, stored end
    local req = read_request(stored.args)
    req.k = stored.keys
    return req
  end

  -- How long the task of a kept request may wait (ms), or `default` without one.
  function L.kept_max_wait(raw, default)
    if not raw then return default end
    local req, earlier = L.stored_request(raw)
    if req then return req[R.max_wait] end
    return earlier.max_wait or default
  end

  -- Put a task at the tail of the wait list (or back at its old place) until capacity frees.
  -- `raw` is the request it keeps (L.kept_request). Returns true the first time this attempt
  -- waits (that is what the audit records).
  function L.enqueue(req, raw, now, verdict)
    local rec = req.k.rec
    local seq = redis.call('HGET', rec, 'wait_seq')
    local attempt = redis.call('HGET', rec, 'attempt')
    if not seq or attempt ~= tostring(req[R.attempt]) then
      seq = redis.call('HINCRBY', L.T.meta, 'wait_seq', 1)
    end
    local first = redis.call('HGET', rec, 'wait_since') == false
      or attempt ~= tostring(req[R.attempt])
    if first then redis.call('HSET', rec, 'wait_since', now) end
    local since = tonumber(redis.call('HGET', rec, 'wait_since'))
    redis.call('ZADD', L.T.waiting, seq, rec)
    L.drop_lease(rec)
    redis.call('HSET', rec, 'id', req[R.id], 'attempt', req[R.attempt], 'where', 'waiting',
      'since', now, 'wait_seq', seq, 'wait_for', verdict.v, 'req', raw)
    redis.call('HDEL', rec, 'settled', 'holder', 'handoff')
    redis.call('ZADD', L.T.ledger, since + req[R.max_wait], rec)
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
      or redis.call('HGET', rec, 'attempt') ~= tostring(req[R.attempt])
    if first then redis.call('HSET', rec, 'wait_since', now) end
    local parked = verdict.turn - now > G.countdown_limit
    local where = parked and 'parked' or 'queued'
    L.drop_lease(rec)
    redis.call('HSET', rec, 'id', req[R.id], 'attempt', req[R.attempt], 'where', where,
      'since', now, 'turn', verdict.turn, 'skip', skip, 'wait_for', verdict.v)
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
  -- A waiting task that now hits a limit of another phase than wait (a rate or a cooldown to book,
  -- a budget spent meanwhile, a cost alert) is published too, so its own delivery books, ends or
  -- holds it. A task that still waits is handled as its limit's hand-off effect says
  -- (`HANDOFF[name]`): 'stop' ends the walk (a concurrency slot: no later task could have
  -- one), 'skip' passes it over (budget held in flight: a later task may fit), 'pass' passes it
  -- over and, from then on, passes over without counting the tasks that need the same (runs in
  -- flight: one run's fan-out must not hide the steps of runs in flight behind it). The walk ends
  -- after `scan` tasks skipped, after `sweep_limit` tasks moved on, or after `scan * 16` looked at.
  -- With `out.grants` (fair dispatch: the pool's grants), it admits at most one task per grant,
  -- each recording its grant (`pool`), only tasks of the pool's queue (`out.queue`), and
  -- `out.blocked` says a limit of the tenant stopped it.
  -- Returns how many tasks it admitted.
  function L.handoff(now, G, out, pv)
    local admitted = L.walk_wait_list(now, G, out, pv)
    L.waiting_since = nil
    return admitted
  end

  function L.walk_wait_list(now, G, out, pv)
    local cache = {}
    local skipped, handled, start, looked, admitted = 0, 0, 0, 0, 0
    local full = {}
    local grants = out.grants
    while skipped < G.scan and handled < G.sweep_limit and looked < G.scan * 16
        and (not grants or admitted < #grants) do
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
        L.audit(out.written, now, {type = AT.task_lost,
          task_id = redis.call('HGET', rec, 'id') or '',
          reason = 'waiting task without a message in the ledger: it cannot be published'})
      else
        local req = L.stored_request(raw)
        local id = req and req[R.id] or redis.call('HGET', rec, 'id')
        local passed = false
        if req then
          for name in pairs(full) do passed = passed or L.needs[name](req, now) end
          -- Fair dispatch gives one pool's capacity: a task of another queue is not for it.
          if grants and out.queue and (req[R.queue] or '') ~= out.queue then passed = true end
        end
        local stored_pv = req and req[R.au_policy_version]
        local reloaded = not req or (pv and stored_pv and stored_pv ~= pv)
        local r = redis.call('HMGET', rec, 'skip', 'wait_since', 'paused_since')
        local came = tonumber(r[2] or now)
        if r[3] then came = math.min(came, tonumber(r[3])) end
        local verdict
        if passed then
          verdict = {kind = 'pass'}
        elseif reloaded then
          verdict = {kind = 'reloaded'}
        else
          L.waiting_since = tonumber(r[2] or now)
          verdict = L.evaluate(req, now, r[1], cache, G.reclaim, came)
        end
        local stale = req and req[R.window_end] and now >= req[R.window_end]
        if stale and verdict.kind == 'admit' then
          -- It began to wait on an earlier day: its request names that day's (and month's) usage
          -- windows, which today's spending never reaches. Its own delivery decides, against
          -- today's windows; the slot stays free for it (nobody behind it is handed it first).
          redis.call('ZREM', L.T.waiting, rec)
          L.requeue(rec, now, G)
          redis.call('HDEL', rec, 'req')
          out.pub[#out.pub + 1] = {id = id, msg = msg}
          break
        elseif verdict.kind == 'pass' then
          start = start + 1
        elseif verdict.kind == 'wait' then
          local effect = HANDOFF[verdict.limit]
          if effect == 'stop' then
            out.blocked = true
            break
          end
          if effect == 'pass' then full[verdict.limit] = true end
          skipped = skipped + 1
          start = start + 1
        else
          handled = handled + 1
          redis.call('ZREM', L.T.waiting, rec)
          if verdict.kind == 'admit' then
            admitted = admitted + 1
            local n = redis.call('HINCRBY', rec, 'handoffs', 1)
            local token = id .. ':' .. req[R.attempt] .. ':' .. n
            local since = tonumber(redis.call('HGET', rec, 'wait_since') or now)
            local lease_exp = math.max(since + req[R.max_wait], now + G.lease)
            L.commit(req, now, verdict, token, 'handed', lease_exp, now + G.grace)
            redis.call('HSET', rec, 'handoff', token, 'msg', msg)
            if grants then redis.call('HSET', rec, 'pool', grants[admitted]) end
            out.pub[#out.pub + 1] = {id = id, msg = msg, token = token}
            cache = {}
          else
            -- Its own delivery decides (books its turn, ends it with the reason, or holds it):
            -- a task always ends on a worker, with its result.
            L.requeue(rec, now, G)
            redis.call('HDEL', rec, 'req')
            out.pub[#out.pub + 1] = {id = id, msg = msg}
          end
        end
      end
    end
    return admitted
  end

end

-- Defines the admission (its limit checks, evaluate, commit) and, with `wait_list`, the wait
-- list and the hand-off too (enqueue, book, requeue, handoff), the first time a call asks.
function L.load_admission(wait_list)
  if not L.evaluate then define_admission() end
  if wait_list and not L.handoff then define_wait_list() end
end
