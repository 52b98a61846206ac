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
-- ARGV[1] the settlement (JSON): id, a (attempt), holder (or force = true: the current one),
--   actual ([steps, tool_calls,
--   input_tokens, output_tokens, cost micro-USD]), ttl ([run, day, month, task]), checks
--   ([[window, kind, limit], ...]), warn (warning threshold %), au (audit template), entry
--   ({type, decision, reason, detail}), next (null, or the next attempt: {msg, due, park}),
--   run (null, or [run id, idle ms]: the run stays in flight that long after this step)
-- ARGV[2] settings (JSON, see admit.lua)   ARGV[3] seals (JSON)   ARGV[4] the writer's id
--
-- Returns JSON {s = settled | late | noop, before, after (check values), au, pub}.

local S = cjson.decode(ARGV[1])
local G = cjson.decode(ARGV[2])
L.seal(ARGV[3], ARGV[4])
local rec = KEYS[8]
local windows = {KEYS[9], KEYS[10], KEYS[11]}
local written, publish = {}, {}

local function reply(t)
  t.au = written
  t.pub = publish
  return cjson.encode(t)
end

local r = redis.call('HMGET', rec, 'attempt', 'holder', 'where', 'settled', 'resv', 'resv_w')
if r[1] ~= tostring(S.a) then return reply({s = 'noop'}) end
-- Forced: the worker's main process settles for a step its pool killed (a hard time limit),
-- whoever held it: the holder's id died with the process.
if S.force then
  if r[3] ~= 'running' or r[4] or not r[2] then return reply({s = 'noop'}) end
  S.holder = r[2]
end
local late = r[2] ~= S.holder
if late then
  if redis.call('HSETNX', rec, 'late:' .. S.holder, 1) == 0 then return reply({s = 'noop'}) end
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
local R_FIELDS = {'r_steps', 'r_tool_calls', 'r_input_tokens', 'r_output_tokens', 'r_cost'}
local current = {}
for w = 1, 3 do
  local usage = windows[w]
  local raw = redis.call('HMGET', usage, 'steps', 'tool_calls', 'input_tokens', 'output_tokens',
    'cost', unpack(R_FIELDS))
  local values, writes = {}, {}
  for i = 1, 10 do values[i] = tonumber(raw[i] or '0') or 0 end
  current[w] = values
  for i = 1, 5 do
    if S.actual[i] ~= 0 then
      writes[#writes + 1] = L.FIELDS[i]
      writes[#writes + 1] = L.int(values[i] + S.actual[i])
    end
    if reserved_in[usage] and reserved[i] ~= 0 then
      writes[#writes + 1] = R_FIELDS[i]
      writes[#writes + 1] = L.int(values[5 + i] - reserved[i])
    end
  end
  if w == 1 then
    writes[#writes + 1] = 'last_ms'
    writes[#writes + 1] = L.int(now)
  end
  if #writes > 0 then redis.call('HSET', usage, unpack(writes)) end
  redis.call('EXPIRE', usage, S.ttl[w])
end
if S.run and S.run ~= cjson.null then
  -- The run stays in flight for its idle time after this step ends (unless it was closed).
  redis.call('ZADD', L.T.runs, 'XX', now + S.run[2], S.run[1])
end
if not late then
  redis.call('ZREM', L.T.leases, rec)
  if r[5] then redis.call('HDEL', rec, 'resv', 'resv_w') end
end

-- The budgets' figures before and after this attempt's usage.
local before, after = {}, {}
for i, check in ipairs(S.checks) do
  local values = current[check[1]]
  local used, add = 0, 0
  for _, f in ipairs(L.KIND_FIELDS[check[2]]) do
    used = used + values[f]
    add = add + S.actual[f]
  end
  before[i], after[i] = used, used + add
end

-- Budget warnings: a threshold crossed by this settlement is recorded once.
for i, check in ipairs(S.checks) do
  local limit = check[3]
  local function pct(x) if limit == 0 then return math.huge end return x * 100 / limit end
  if pct(before[i]) < S.warn and S.warn <= pct(after[i]) and after[i] <= limit then
    L.task_entry(written, now, S.au, 'budget_warning', 'allow', '', {
      violation = L.KIND_VIOLATION[check[2]], current = after[i], limit = limit,
      percent = math.floor(pct(after[i]))})
  end
end

L.task_entry(written, now, S.au, S.entry.type, S.entry.decision, S.entry.reason, S.entry.detail)

if not late then
  local nxt = S.next
  if nxt and nxt ~= cjson.null then
    -- The retry's delay is not idle time of the run: it ends at this settlement.
    redis.call('HSET', rec, 'settled', 1, 'since', now, 'where', nxt.park and 'parked' or 'queued',
      'msg', nxt.msg, 'paused_since', now)
    redis.call('ZADD', L.T.ledger, nxt.park and nxt.due or nxt.due + G.grace, rec)
  else
    redis.call('HSET', rec, 'settled', 1, 'since', now, 'where', 'done')
    redis.call('ZREM', L.T.ledger, rec)
    redis.call('EXPIRE', rec, S.ttl[4])
  end
  redis.call('HDEL', rec, 'wait_since', 'wait_seq', 'wait_for', 'handoffs', 'turn', 'skip', 'fail')
  if redis.call('ZCARD', L.T.waiting) > 0 then
    L.handoff(now, G, {pub = publish, written = written}, S.pv)
  end
end

return reply({s = late and 'late' or 'settled', before = before, after = after})
