-- settle.lua: atomic settlement of one admitted task, in one round trip.
-- Releases the lease, replaces the task's reservation with its actual usage in every window,
-- and marks the attempt settled. Settling an unknown, other or already settled attempt is a
-- no-op, so nothing is ever counted twice. A holder that lost its lease to another delivery of
-- the same attempt settles "late": its usage is counted (once), the other's lease is untouched.
--
-- KEYS[1]      leases              ZSET  task id -> lease expiry (ms)
-- KEYS[2]      task record         HASH  attempt, holder, state, lease_exp, counted
-- KEYS[3..5]   run window          usage HASH, reservations HASH, reservation expiry ZSET
-- KEYS[6..8]   day window          (same three)
-- KEYS[9..11]  month window        (same three)
--
-- ARGV[1]  task id                 ARGV[2]  attempt
-- ARGV[3..7] actual usage: steps, tool_calls, input_tokens, output_tokens, cost (micro-USD)
-- ARGV[8..10] key TTL seconds of the run, day and month windows
-- ARGV[11] holder: the id of the delivery that was admitted
-- ARGV[12] number N of budget checks, then N pairs from ARGV[13]: window (1..3), kind
--
-- Returns {'settled' | 'late', used_before_1, used_after_1, ...} or {'noop'}.

-- The ARGV described above arrive as one JSON array of strings (one argument to encode
-- instead of dozens); decoding it here keeps every index and comparison unchanged.
local ARGV = cjson.decode(ARGV[1])

local FIELDS = {'steps', 'tool_calls', 'input_tokens', 'output_tokens', 'cost'}
local KIND_FIELDS = {
  steps = {1}, tool_calls = {2}, tokens = {3, 4}, input_tokens = {3}, output_tokens = {4},
  cost = {5},
}

local task_id, attempt, holder = ARGV[1], ARGV[2], ARGV[11]
if redis.call('HGET', KEYS[2], 'attempt') ~= attempt then return {'noop'} end
local late = redis.call('HGET', KEYS[2], 'holder') ~= holder
if late then
  if redis.call('HSETNX', KEYS[2], 'late:' .. holder, 1) == 0 then return {'noop'} end
elseif redis.call('HGET', KEYS[2], 'state') ~= 'admitted' then
  return {'noop'}
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local function used(usage, kind)
  local total = 0
  for _, f in ipairs(KIND_FIELDS[kind]) do
    total = total + tonumber(redis.call('HGET', usage, FIELDS[f]) or '0')
  end
  return total
end

local n_checks = tonumber(ARGV[12])
local function check_values()
  local values = {}
  for i = 1, n_checks do
    local w = tonumber(ARGV[13 + 2 * (i - 1)])
    values[i] = used(KEYS[3 * w], ARGV[14 + 2 * (i - 1)])
  end
  return values
end
local before = check_values()

if not late then redis.call('ZREM', KEYS[1], task_id) end
for w = 1, 3 do
  local usage, resv, expiry = KEYS[3 * w], KEYS[3 * w + 1], KEYS[3 * w + 2]
  local packed = not late and redis.call('HGET', resv, task_id)
  if packed then
    local i = 1
    for value in string.gmatch(packed, '[^,]+') do
      local n = tonumber(value)
      if n ~= 0 then redis.call('HINCRBY', usage, 'r_' .. FIELDS[i], -n) end
      i = i + 1
    end
    redis.call('HDEL', resv, task_id)
    redis.call('ZREM', expiry, task_id)
  end
  for i = 1, 5 do
    local n = tonumber(ARGV[2 + i])
    if n ~= 0 then redis.call('HINCRBY', usage, FIELDS[i], n) end
  end
  redis.call('HSET', usage, 'last_ms', now)
  redis.call('EXPIRE', usage, ARGV[7 + w])
end
if not late then redis.call('HSET', KEYS[2], 'state', 'settled') end

local after = check_values()
local result = {late and 'late' or 'settled'}
for i = 1, n_checks do
  result[#result + 1] = tostring(before[i])
  result[#result + 1] = tostring(after[i])
end
return result
