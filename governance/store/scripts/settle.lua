-- settle.lua: one admitted attempt ends, in one atomic call (lib.lua is prepended). Releases the
-- lease, replaces the reservation with the actual usage in every window, writes the attempt's
-- outcome (finished, failed, or a retry scheduled) and any budget warning it crossed to the
-- audit chain, moves the ledger record on (done, or queued / parked for the next attempt), and
-- hands the freed capacity to the oldest waiting tasks that fit. Settling an unknown, other or
-- already settled attempt is a no-op, so nothing is ever counted twice. A holder that lost its
-- lease to another delivery of the same attempt settles "late": its usage counts once, the other
-- delivery's lease, reservation and record are left alone.
--
-- KEYS[1..7]  the tenant's shared keys (see lib.lua)
-- KEYS[8]     the task's record   HASH
-- KEYS[9..11] usage of the run, day and month windows   HASH
--
-- ARGV: the settlement (vocabulary.SETTLEMENT, read into `s` by read_settlement: `s[F.holder]`),
-- the settings (`G`), the seals of this writer's earlier entries and the writer's id.
--
-- With `pool_gated` (the worker pool is saturated: fair dispatch) the freed capacity is not
-- handed on here: the caller tells the pool (pool_dispatch.lua), which gives it to the tenant
-- furthest below its fair share. The attempt's worker time is counted per minute in the
-- tenant's meta (`busy:<minute>`), for its share of the pool.
--
-- Returns JSON {s = settled | late | noop, before, after (check values), au, pub,
--   pool (the grant of a task fair dispatch handed on: given back by the caller),
--   waiting (tasks of the tenant still waiting)}.

local s = read_settlement(ARGV)
local G = read_settings(ARGV)
L.seal(ARGV[F.seals], ARGV[F.writer])
local rec = KEYS[8]
local windows = {KEYS[9], KEYS[10], KEYS[11]}
local written, publish = {}, {}

local function reply(t)
  t.au = written
  t.pub = publish
  return cjson.encode(t)
end

local r = redis.call('HMGET', rec, 'attempt', 'holder', 'where', 'settled', 'resv', 'resv_w',
  'pool')
if r[1] ~= tostring(s[F.attempt]) then return reply({s = 'noop'}) end
local holder = s[F.holder]
-- Forced: the worker's main process settles for a step its pool killed (a hard time limit),
-- whoever held it: the holder's id died with the process.
if s[F.force] then
  if r[3] ~= 'running' or r[4] or not r[2] then return reply({s = 'noop'}) end
  holder = r[2]
end
local late = r[2] ~= holder
if late then
  if redis.call('HSETNX', rec, 'late:' .. holder, 1) == 0 then return reply({s = 'noop'}) end
elseif r[3] ~= 'running' or r[4] then
  return reply({s = 'noop'})
end
local now = L.now_ms()

-- What this attempt reserved, and where (a late holder's reservation was taken over already).
local reserved, reserved_in = {0, 0, 0, 0, 0}, {}
if not late and r[5] then
  local i = 1
  for value in string.gmatch(r[5], '[^,]+') do reserved[i] = tonumber(value); i = i + 1 end
  for usage in string.gmatch(r[6] or '', '[^|]+') do reserved_in[usage] = true end
end

-- Each window read once and written once: used += actual, reserved -= what was reserved.
local n = #USAGE
local fields, actual = WINDOW_FIELDS, {}
for i = 1, n do actual[i] = s[F.actual + i] end
local current = {}
for w = 1, 3 do
  local usage = windows[w]
  local values = read_usage(usage)
  local writes, k = {}, 0
  current[w] = values
  local releases = reserved_in[usage]
  for i = 1, n do
    if actual[i] ~= 0 then
      writes[k + 1], writes[k + 2], k = fields[i], string.format('%d', values[i] + actual[i]), k + 2
    end
    if releases and reserved[i] ~= 0 then
      writes[k + 1], writes[k + 2], k = fields[n + i],
        string.format('%d', values[n + i] - reserved[i]), k + 2
    end
  end
  if w == 1 then writes[k + 1], writes[k + 2], k = 'last_ms', string.format('%d', now), k + 2 end
  if k > 0 then redis.call('HSET', usage, unpack(writes)) end
  redis.call('EXPIRE', usage, s[F.ttl + w])
end
if s[F.run] then
  -- The run stays in flight for its idle time after this step ends (unless it was closed).
  redis.call('ZADD', L.T.runs, 'XX', now + s[F.run_idle_ms], s[F.run])
end
if not late then redis.call('ZREM', L.T.leases, rec) end

-- The budgets' figures before and after this attempt's usage (a check: {window, limit, first
-- and last usage field it sums, violation}).
local before, after = {}, {}
local checks = s[F.checks] or {}
for i, check in ipairs(checks) do
  local values = current[check[1]]
  local used, add = 0, 0
  for f = check[3], check[4] do
    used = used + values[f]
    add = add + actual[f]
  end
  before[i], after[i] = used, used + add
end

-- Budget warnings: a threshold crossed by this settlement is recorded once.
local warn = s[F.warn]
local au = L.template(s, F.au)
for i, check in ipairs(checks) do
  local limit = check[2]
  local function pct(x) if limit == 0 then return math.huge end return x * 100 / limit end
  if pct(before[i]) < warn and warn <= pct(after[i]) and after[i] <= limit then
    L.task_entry(written, now, au, AT.budget_warning, 'allow', '', {
      violation = check[5], current = after[i], limit = limit,
      percent = math.floor(pct(after[i]))})
  end
end

L.task_entry(written, now, au, s[F.entry_type], s[F.entry_decision], s[F.entry_reason],
  s[F.entry_detail])

if not late then
  if s[F.next_msg] then
    -- The retry's delay is not idle time of the run: it ends at this settlement.
    local parked = s[F.next_parked]
    -- `next_attempt` is the marker the next attempt is admitted on: it names the one attempt
    -- this settlement scheduled (a copy claiming any other later attempt is dropped).
    redis.call('HSET', rec, 'settled', 1, 'since', now, 'where', parked and 'parked' or 'queued',
      'msg', s[F.next_msg], 'paused_since', now, 'next_attempt', s[F.attempt] + 1)
    redis.call('ZADD', L.T.ledger, parked and s[F.next_due] or s[F.next_due] + G.grace, rec)
  else
    redis.call('HSET', rec, 'settled', 1, 'since', now, 'where', 'done')
    redis.call('ZREM', L.T.ledger, rec)
    redis.call('EXPIRE', rec, s[F.ttl_task])
  end
  -- (The reservation goes with them: the windows gave it back above.)
  redis.call('HDEL', rec, 'resv', 'resv_w', 'wait_since', 'wait_seq', 'wait_for', 'handoffs',
    'turn', 'skip', 'fail')
  if not s[F.pool_gated] and redis.call('ZCARD', L.T.waiting) > 0 then
    L.load_admission(true)
    L.handoff(now, G, {pub = publish, written = written}, s[F.policy_version])
  end
end

-- The tenant's worker time, per minute (its share of the pool, over the last minute).
local run_ms = s[F.run_ms]
if run_ms and run_ms > 0 then
  local minute = math.floor(now / 60000)
  redis.call('HINCRBY', L.T.meta, 'busy:' .. minute, math.floor(run_ms))
  redis.call('HDEL', L.T.meta, 'busy:' .. (minute - 2))
end
-- The grant of a task fair dispatch handed on ends with it (not with a late holder's: the
-- delivery that took its lease over still runs under it).
local grant = not late and r[7] or nil
if grant then redis.call('HDEL', rec, 'pool') end
return reply({s = late and 'late' or 'settled', before = before, after = after,
  pool = grant or nil, waiting = redis.call('ZCARD', L.T.waiting)})
