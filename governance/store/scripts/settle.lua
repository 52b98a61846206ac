-- settle.lua: one admitted attempt ends, in one atomic call (lib.lua is prepended). Releases the
-- lease, replaces the reservation with the actual usage in every window, writes the attempt's
-- outcome (finished, failed, or a retry scheduled) and any budget warning it crossed to the
-- audit chain, moves the ledger record on (done, or queued / parked for the next attempt), and
-- hands the freed capacity to the oldest waiting tasks that fit. Settling an unknown, other or
-- already settled attempt is a no-op, so nothing is ever counted twice. A holder that lost its
-- lease to another delivery of the same attempt settles "late": its usage counts once, the other
-- delivery's lease and record are left alone.
--
-- KEYS[1..7]  the tenant's shared keys (see lib.lua)
-- KEYS[8]     the task's record   HASH
-- KEYS[9..17] usage, reservations and reservation expiry of the run, day and month windows
--
-- ARGV[1] the settlement (JSON): id, a (attempt), holder, k (rec, w[9]), actual ([steps,
--   tool_calls, input_tokens, output_tokens, cost micro-USD]), ttl ([run, day, month, task]),
--   checks ([[window, kind, limit], ...]), warn (warning threshold %), au (audit template),
--   entry ({type, decision, reason, detail}), next (null, or the next attempt: {msg, due, park})
-- ARGV[2] settings (JSON, see admit.lua)   ARGV[3] seals (JSON)   ARGV[4] the writer's id
--
-- Returns JSON {s = settled | late | noop, before, after (check values), au, pub}.

local S = cjson.decode(ARGV[1])
local G = cjson.decode(ARGV[2])
L.seal(ARGV[3], ARGV[4])
local rec = S.k.rec
local written, publish = {}, {}

local function reply(t)
  t.au = written
  t.pub = publish
  return cjson.encode(t)
end

if redis.call('HGET', rec, 'attempt') ~= tostring(S.a) then return reply({s = 'noop'}) end
local late = redis.call('HGET', rec, 'holder') ~= S.holder
if late then
  if redis.call('HSETNX', rec, 'late:' .. S.holder, 1) == 0 then return reply({s = 'noop'}) end
elseif redis.call('HGET', rec, 'where') ~= 'running' or redis.call('HGET', rec, 'settled') then
  return reply({s = 'noop'})
end
local now = L.now_ms()

local function used(usage, kind)
  local total = 0
  for _, f in ipairs(L.KIND_FIELDS[kind]) do
    total = total + tonumber(redis.call('HGET', usage, L.FIELDS[f]) or '0')
  end
  return total
end
local function check_values()
  local values = {}
  for i, check in ipairs(S.checks) do values[i] = used(L.window(S, check[1]), check[2]) end
  return values
end
local before = check_values()

if not late then redis.call('ZREM', L.T.leases, S.id) end
for w = 1, 3 do
  local usage, resv, expiry = L.window(S, w)
  if not late then
    L.release(usage, resv, S.id)
    redis.call('ZREM', expiry, S.id)
  end
  for i = 1, 5 do
    local n = S.actual[i]
    if n ~= 0 then redis.call('HINCRBY', usage, L.FIELDS[i], n) end
  end
  redis.call('HSET', usage, 'last_ms', now)
  redis.call('EXPIRE', usage, S.ttl[w])
end
local after = check_values()

-- Budget warnings: a threshold crossed by this settlement is recorded once.
for i, check in ipairs(S.checks) do
  local limit = check[3]
  local function pct(x) if limit == 0 then return math.huge end return x * 100 / limit end
  if pct(before[i]) < S.warn and S.warn <= pct(after[i]) and after[i] <= limit then
    local v = L.KIND_VIOLATION[check[2]]
    L.task_entry(written, now, S.au, 'budget_warning', 'allow', '', {
      violation = v, current = after[i], limit = limit,
      percent = math.floor(pct(after[i]))})
  end
end

L.task_entry(written, now, S.au, S.entry.type, S.entry.decision, S.entry.reason, S.entry.detail)

if not late then
  redis.call('HSET', rec, 'settled', 1, 'since', now)
  redis.call('HDEL', rec, 'wait_since', 'wait_seq', 'wait_for', 'handoffs', 'turn', 'skip', 'fail')
  local nxt = S.next
  if nxt and nxt ~= cjson.null then
    local where = nxt.park and 'parked' or 'queued'
    redis.call('HSET', rec, 'where', where, 'msg', nxt.msg)
    redis.call('ZADD', L.T.ledger, nxt.park and nxt.due or nxt.due + G.grace, rec)
  else
    redis.call('HSET', rec, 'where', 'done')
    redis.call('ZREM', L.T.ledger, rec)
    redis.call('EXPIRE', rec, S.ttl[4])
  end
  if redis.call('ZCARD', L.T.waiting) > 0 then
    L.handoff(now, G, {pub = publish, written = written})
  end
end

return reply({s = late and 'late' or 'settled', before = before, after = after})
