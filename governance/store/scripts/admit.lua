-- admit.lua: atomic admission of one governed task, in one round trip.
-- Checks, in order, without writing anything: provider cooldown, tenant rate, provider rate,
-- tenant concurrency (lease), long-running limits of the run, budgets (used + reserved + this
-- task's estimate). Only when every check passes does it commit: rate tokens, the lease, and the
-- reservation in each window. Idempotent per (task id, attempt): the holder (one id per delivery
-- of the message) that was admitted gets the same answer again; another delivery of the same
-- attempt waits while that lease is alive (the action never runs twice at once) and, once the
-- lease expired (its holder died), is admitted in its place with the stale reservation replaced.
--
-- KEYS[1]      leases              ZSET  task id -> lease expiry (ms)
-- KEYS[2]      task record         HASH  attempt, holder, state, lease_exp, counted
-- KEYS[3]      provider cooldown   STRING until (ms); a placeholder key for tool calls
-- KEYS[4]      tenant rate         STRING GCRA theoretical arrival time (ms)
-- KEYS[5]      provider rate       STRING GCRA theoretical arrival time (ms); or placeholder
-- KEYS[6..8]   run window          usage HASH, reservations HASH, reservation expiry ZSET
-- KEYS[9..11]  day window          (same three)
-- KEYS[12..14] month window        (same three)
-- KEYS[15]     step repetitions    HASH  input hash -> times admitted in the run
--
-- ARGV[1]  task id                 ARGV[2]  attempt
-- ARGV[3]  lease ms                ARGV[4]  concurrency limit (-1: none)
-- ARGV[5]  retry hint ms for concurrency and reservation pressure
-- ARGV[6]  check cooldown (1/0)
-- ARGV[7]  tenant rate emission interval ms (0: none)      ARGV[8]  tenant burst
-- ARGV[9]  provider rate emission interval ms (0: none)    ARGV[10] provider burst
-- ARGV[11..15] estimate: steps, tool_calls, input_tokens, output_tokens, cost (micro-USD)
-- ARGV[16] discovery depth         ARGV[17] max discovery depth (-1: none)
-- ARGV[18] max discovered steps (-1: none)
-- ARGV[19] idle timeout ms (-1: none)
-- ARGV[20] max same-step repetitions (-1: none)              ARGV[21] input hash of the step
-- ARGV[22..24] key TTL seconds of the run, day and month windows
-- ARGV[25] task record TTL seconds
-- ARGV[26] holder: the id of this delivery of the task
-- ARGV[27] number N of budget checks, then N triplets from ARGV[28]:
--          window (1 run, 2 day, 3 month), kind (steps|tool_calls|tokens|input_tokens|
--          output_tokens|cost), limit
--
-- Returns {status, violation, current, limit, wait_ms, lease_exp, index of the blocking budget
-- check (0: none), current value of check 1, of check 2, ...}
-- status: admitted | in_flight | settled | deferred | rejected (all values are strings).

-- The ARGV described above arrive as one JSON array of strings (one argument to encode
-- instead of dozens); decoding it here keeps every index and comparison unchanged.
local ARGV = cjson.decode(ARGV[1])

local FIELDS = {'steps', 'tool_calls', 'input_tokens', 'output_tokens', 'cost'}
local KIND_FIELDS = {
  steps = {1}, tool_calls = {2}, tokens = {3, 4}, input_tokens = {3}, output_tokens = {4},
  cost = {5},
}

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local task_id, attempt, holder = ARGV[1], ARGV[2], ARGV[26]
local lease_exp = now + tonumber(ARGV[3])
local retry_hint = tonumber(ARGV[5])
local amounts = {}
for i = 1, 5 do amounts[i] = tonumber(ARGV[10 + i]) end

local function window_keys(w)
  local base = 3 + 3 * w
  return KEYS[base], KEYS[base + 1], KEYS[base + 2]
end

-- Every counter of a window, read once (one HMGET) and reused by every check below.
local WINDOW_FIELDS = {'steps', 'tool_calls', 'input_tokens', 'output_tokens', 'cost',
  'r_steps', 'r_tool_calls', 'r_input_tokens', 'r_output_tokens', 'r_cost', 'last_ms',
  'discovered'}
local window_cache = {}
local function window_values(w)
  if not window_cache[w] then
    local usage = window_keys(w)
    local raw = redis.call('HMGET', usage, unpack(WINDOW_FIELDS))
    local values = {}
    for i, name in ipairs(WINDOW_FIELDS) do values[name] = tonumber(raw[i] or '0') or 0 end
    values.has_last = raw[11] ~= false
    window_cache[w] = values
  end
  return window_cache[w]
end

-- Give back one task's reservation in one window (a no-op when it holds none there).
local function release(usage, resv, id)
  local packed = redis.call('HGET', resv, id)
  if not packed then return end
  local i = 1
  for value in string.gmatch(packed, '[^,]+') do
    local n = tonumber(value)
    if n ~= 0 then redis.call('HINCRBY', usage, 'r_' .. FIELDS[i], -n) end
    i = i + 1
  end
  redis.call('HDEL', resv, id)
end

local function reply(status, violation, current, limit, wait, check)
  return {status, violation or '', tostring(current or ''), tostring(limit or ''),
          tostring(wait or 0), tostring(lease_exp), tostring(check or 0)}
end

-- Idempotency: the same attempt of the same task is admitted at most once.
local record_attempt = redis.call('HGET', KEYS[2], 'attempt')
if record_attempt == attempt then
  local state = redis.call('HGET', KEYS[2], 'state')
  if state == 'settled' then return reply('settled') end
  local expiry = redis.call('ZSCORE', KEYS[1], task_id)
  if expiry and tonumber(expiry) > now then
    if redis.call('HGET', KEYS[2], 'holder') ~= holder then
      -- Another delivery of this attempt is running: wait for it to settle or to die.
      return reply('in_flight', 'in_flight', 0, 0, math.max(1, math.min(retry_hint,
        tonumber(expiry) - now)))
    end
    redis.call('ZADD', KEYS[1], lease_exp, task_id)
    for w = 1, 3 do
      local _, _, expiry_key = window_keys(w)
      redis.call('ZADD', expiry_key, 'XX', lease_exp, task_id)
    end
    redis.call('HSET', KEYS[2], 'lease_exp', lease_exp)
    return reply('admitted')
  end
  -- The lease expired (its holder stopped renewing it): admit afresh below, replacing the
  -- stale reservation.
end

-- Reclaim leases and reservations whose holder stopped renewing them (a crashed worker).
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for w = 1, 3 do
  local usage, resv, expiry = window_keys(w)
  local expired = redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'LIMIT', 0, 256)
  for _, id in ipairs(expired) do
    release(usage, resv, id)
    redis.call('ZREM', expiry, id)
  end
end

local deferred, rejected -- first violation of each kind: {type, current, limit, wait}

-- Provider cooldown (a shared Retry-After).
if ARGV[6] == '1' then
  local until_ms = tonumber(redis.call('GET', KEYS[3]) or '0')
  if until_ms > now then deferred = {'cooldown', until_ms - now, 0, until_ms - now} end
end

-- Rate limits: GCRA, allowing `burst` calls at once and one per interval after that.
local function gcra(key, interval, burst)
  if interval <= 0 then return nil, 0 end
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - burst * interval
  if allow_at > now then return nil, allow_at - now end
  return new_tat, 0
end
local tenant_interval, provider_interval = tonumber(ARGV[7]), tonumber(ARGV[9])
local tenant_tat, tenant_wait = gcra(KEYS[4], tenant_interval, tonumber(ARGV[8]))
if tenant_wait > 0 and not deferred then
  deferred = {'rate_limit:tenant', 0, ARGV[8], tenant_wait}
end
local provider_tat, provider_wait = gcra(KEYS[5], provider_interval, tonumber(ARGV[10]))
if provider_wait > 0 and not deferred then
  deferred = {'rate_limit:provider', 0, ARGV[10], provider_wait}
end

-- Concurrency: one lease per running task.
local concurrency = tonumber(ARGV[4])
local running = redis.call('ZCARD', KEYS[1])
local holding = redis.call('ZSCORE', KEYS[1], task_id)
if concurrency >= 0 and not holding and running >= concurrency and not deferred then
  local wait = retry_hint
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if first[2] then wait = math.max(1, math.min(wait, tonumber(first[2]) - now)) end
  deferred = {'concurrency_limit', running + 1, concurrency, wait}
end

-- Long-running limits of the run: these never get better by waiting.
local run_usage = KEYS[6]
local first_time = not redis.call('HGET', KEYS[2], 'counted')
local depth, max_depth = tonumber(ARGV[16]), tonumber(ARGV[17])
if max_depth >= 0 and depth > max_depth then
  rejected = {'discovery_depth_limit', depth, max_depth, 0}
end
local max_discovered = tonumber(ARGV[18])
if not rejected and first_time and depth > 0 and max_discovered >= 0 then
  local discovered = window_values(1).discovered + 1
  if discovered > max_discovered then
    rejected = {'discovered_step_limit', discovered, max_discovered, 0}
  end
end
local idle_ms = tonumber(ARGV[19])
if not rejected and idle_ms >= 0 and window_values(1).has_last then
  local last = window_values(1).last_ms
  if now - last >= idle_ms then
    rejected = {'idle_timeout', math.floor((now - last) / 1000), idle_ms / 1000, 0}
  end
end
local max_repetitions = tonumber(ARGV[20])
if not rejected and first_time and max_repetitions >= 0 then
  local seen = tonumber(redis.call('HGET', KEYS[15], ARGV[21]) or '0') + 1
  if seen > max_repetitions then rejected = {'same_step_loop', seen, max_repetitions, 0} end
end

-- Budgets: used + reserved by tasks in flight + this task's estimate must stay within the limit.
-- Exhausted without the reservations of others: rejected. Only over because of them: deferred.
local checks = {}
local n_checks = tonumber(ARGV[27])
for i = 1, n_checks do
  local base = 28 + 3 * (i - 1)
  local values = window_values(tonumber(ARGV[base]))
  local kind, limit = ARGV[base + 1], tonumber(ARGV[base + 2])
  local used, reserved, add = 0, 0, 0
  for _, f in ipairs(KIND_FIELDS[kind]) do
    used = used + values[FIELDS[f]]
    reserved = reserved + values['r_' .. FIELDS[f]]
    add = add + amounts[f]
  end
  local current = used + reserved + add
  checks[i] = current
  if current > limit then
    local violation = kind == 'steps' and 'step_limit' or kind == 'tool_calls' and 'tool_call_limit'
      or kind == 'tokens' and 'token_limit' or kind == 'cost' and 'cost_limit'
      or kind .. '_limit'
    if used + add > limit then
      if not rejected then rejected = {violation, used + add, limit, 0, i} end
    elseif not deferred then
      deferred = {violation, current, limit, retry_hint, i}
    end
  end
end

local function with_checks(result)
  for i = 1, n_checks do result[#result + 1] = tostring(checks[i]) end
  return result
end
if rejected then
  return with_checks(reply('rejected', rejected[1], rejected[2], rejected[3], 0, rejected[5]))
end
if deferred then
  return with_checks(reply('deferred', deferred[1], deferred[2], deferred[3],
    math.ceil(deferred[4]), deferred[5]))
end

-- Commit.
if tenant_tat then
  redis.call('SET', KEYS[4], tenant_tat, 'PX', math.ceil(tenant_tat - now) + 1000)
end
if provider_tat then
  redis.call('SET', KEYS[5], provider_tat, 'PX', math.ceil(provider_tat - now) + 1000)
end
redis.call('ZADD', KEYS[1], lease_exp, task_id)
local packed = table.concat(amounts, ',')
local reserves = false
for i = 1, 5 do if amounts[i] ~= 0 then reserves = true end end
for w = 1, 3 do
  local usage, resv, expiry = window_keys(w)
  release(usage, resv, task_id)
  if reserves then
    redis.call('HSET', resv, task_id, packed)
    for i = 1, 5 do
      if amounts[i] ~= 0 then redis.call('HINCRBY', usage, 'r_' .. FIELDS[i], amounts[i]) end
    end
    redis.call('ZADD', expiry, lease_exp, task_id)
    redis.call('EXPIRE', resv, ARGV[21 + w])
    redis.call('EXPIRE', expiry, ARGV[21 + w])
  end
  redis.call('HSETNX', usage, 'started_ms', now)
  redis.call('HSET', usage, 'last_ms', now)
  redis.call('EXPIRE', usage, ARGV[21 + w])
end
if first_time then
  if depth > 0 then redis.call('HINCRBY', run_usage, 'discovered', 1) end
  local deepest = tonumber(redis.call('HGET', run_usage, 'max_depth') or '0')
  if depth > deepest then redis.call('HSET', run_usage, 'max_depth', depth) end
  redis.call('HINCRBY', KEYS[15], ARGV[21], 1)
  redis.call('EXPIRE', KEYS[15], ARGV[22])
end
redis.call('HSET', KEYS[2], 'attempt', attempt, 'holder', holder, 'state', 'admitted',
  'lease_exp', lease_exp, 'counted', 1)
redis.call('EXPIRE', KEYS[2], ARGV[25])
return with_checks(reply('admitted'))
