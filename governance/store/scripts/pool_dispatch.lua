-- pool_dispatch.lua: the worker pool of one queue, while it is saturated, gives freed capacity
-- to the tenant furthest below its weighted fair share (start-time fair queueing over the
-- tenants with tasks waiting for it), in one atomic call on the pool's own slot: it never
-- touches a tenant's keys (the caller then asks that tenant's dispatch.lua to hand its oldest
-- waiting tasks on). The same call takes note of what ended (a dispatched task's grant, and what
-- it actually cost: its tenant's share is corrected), of grants a tenant could not use, and of
-- tenants whose tasks wait for the pool.
--
-- A tenant that starts to wait gets the start tag max(V, F): the pool's virtual time V, or where
-- its share ended. The tenant with the smallest start tag is served; V moves to its tag, and its
-- tag moves on by the estimated cost of what it was given, divided by its weight. A dispatch
-- gives about `slack_ms` of estimated work (short tasks in batches, long ones one by one), while
-- the dispatched tasks in flight (running, or in the broker) stay within the capacity plus the
-- prefetch or the slack, whichever is more. Each dispatched task carries a grant token, given
-- back when it settles (or, as a backstop, when its `grant_ttl_ms` passes).
--
-- KEYS[1] workers     HASH  node -> "<pool size>:<expires ms>" (pool_worker.lua)
-- KEYS[2] ready       ZSET  tenant -> start tag: tenants with tasks waiting for the pool
-- KEYS[3] tenants     HASH  "<tenant>:f" finish tag, ":w" weight, ":wo" and ":wo_until" an
--                           operator's weight and until when (ms), ":ms" mean run time (ms),
--                           ":c" mean cost, ":b" blocked by its own limits (passed over)
-- KEYS[4] grants      ZSET  grant -> backstop expiry (ms): dispatched tasks in flight
-- KEYS[5] grant info  HASH  grant -> "<tenant>|<estimated cost>"
-- KEYS[6] state       HASH  vtime, saturated (1 while tasks wait for the pool, or the broker
--                           was found backlogged less than BACKLOG_HOLD_MS ago), backlog_until,
--                           seq
--
-- ARGV (vocabulary.POOL_DISPATCH): what ended, what was given back, who waits, whether to
-- saturate and to dispatch, and the pool's parameters (see there).
--
-- Returns JSON {tenant, grants = [...], n, saturated, capacity, in_flight}: `tenant` and
-- `grants` when capacity was given (the caller hands it on with dispatch.lua).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local MEAN_ALPHA = 0.2
-- How long a pool stays saturated after a delivery found the broker backlogged (ms).
local BACKLOG_HOLD_MS = 2000
-- Tenants at the head of the ready set looked at for one its own limits do not block.
local BLOCKED_SCAN = 16

local function num(key, field, default)
  return tonumber(redis.call('HGET', key, field) or '') or default
end
local function tenant_num(tenant, field, default)
  return num(KEYS[3], tenant .. ':' .. field, default)
end
-- A tenant's weight: an operator's override while it lasts (`:wo`, `:wo_until`), else the
-- policy's (registered with its waiting tasks).
local function weight(tenant)
  if tenant_num(tenant, 'wo_until', 0) > now then return tenant_num(tenant, 'wo', 1) end
  return tenant_num(tenant, 'w', 1)
end

-- Move a tenant's share by `delta` of cost (its finish tag, and its start tag while it waits).
local function charge(tenant, delta)
  if delta == 0 then return end
  local w = weight(tenant)
  redis.call('HINCRBYFLOAT', KEYS[3], tenant .. ':f', delta / w)
  if redis.call('ZSCORE', KEYS[2], tenant) then redis.call('ZINCRBY', KEYS[2], delta / w, tenant) end
end

local function mean(tenant, field, sample)
  local key = tenant .. ':' .. field
  local previous = tonumber(redis.call('HGET', KEYS[3], key) or '')
  local value = previous and (previous + MEAN_ALPHA * (sample - previous)) or sample
  redis.call('HSET', KEYS[3], key, tostring(value))
end

-- A grant ends: its estimated cost comes off its tenant's share (`refund`: it was never used),
-- or is replaced by what it cost.
local function end_grant(grant, refund, cost)
  local info = redis.call('HGET', KEYS[5], grant)
  redis.call('ZREM', KEYS[4], grant)
  redis.call('HDEL', KEYS[5], grant)
  if not info then return end
  local tenant, est = string.match(info, '^(.*)|([^|]*)$')
  est = tonumber(est) or 0
  if refund then charge(tenant, -est) elseif cost then charge(tenant, cost - est) end
end

-- What ended.
local completed, completed_tenant = text(ARGV[F.completed]), text(ARGV[F.completed_tenant])
if completed then
  end_grant(completed, false, tonumber(ARGV[F.completed_cost]))
elseif completed_tenant then
  -- A task the pool did not dispatch (it entered the broker before the pool was saturated)
  -- used the pool all the same: its tenant is charged what it cost.
  charge(completed_tenant, tonumber(ARGV[F.completed_cost]) or 0)
  -- While no tenant waits for the pool, that took nothing from anyone: the virtual time keeps
  -- up with it, so the tenant is not passed over for it once others wait (no credit for being
  -- idle, no debt for using what nobody wanted). Once a tenant waits, it is a debt.
  if redis.call('ZCARD', KEYS[2]) == 0 then
    local finish = tenant_num(completed_tenant, 'f', 0)
    if finish > num(KEYS[6], 'vtime', 0) then
      redis.call('HSET', KEYS[6], 'vtime', tostring(finish))
    end
  end
end
if completed_tenant then
  local run_ms, cost = tonumber(ARGV[F.completed_run_ms]), tonumber(ARGV[F.completed_cost])
  if run_ms then mean(completed_tenant, 'ms', run_ms) end
  if cost then mean(completed_tenant, 'c', cost) end
end

-- What a tenant could not use.
for _, grant in ipairs(json(ARGV[F.returned]) or {}) do end_grant(grant, true) end
local returned_tenant = text(ARGV[F.returned_tenant])
if returned_tenant and ARGV[F.returned_blocked] == '1' then
  -- Its own limits stand in the way (its concurrency is taken by its tasks in flight): it keeps
  -- its place (its start tag), passed over until one of its tasks ends or it waits again, so
  -- what it is owed is not lost while its own tasks run.
  redis.call('HSET', KEYS[3], returned_tenant .. ':b', '1')
elseif returned_tenant and ARGV[F.returned_done] == '1' then
  redis.call('ZREM', KEYS[2], returned_tenant)
  redis.call('HDEL', KEYS[3], returned_tenant .. ':b')
end
if completed_tenant then redis.call('HDEL', KEYS[3], completed_tenant .. ':b') end

-- Who waits: a tenant that starts to wait is served from max(V, its finish tag).
local vtime = num(KEYS[6], 'vtime', 0)
for _, entry in ipairs(json(ARGV[F.register]) or {}) do
  local tenant, w = entry[1], tonumber(entry[2]) or 1
  redis.call('HSET', KEYS[3], tenant .. ':w', tostring(w))
  redis.call('HDEL', KEYS[3], tenant .. ':b')
  if not redis.call('ZSCORE', KEYS[2], tenant) then
    redis.call('ZADD', KEYS[2], math.max(vtime, tenant_num(tenant, 'f', 0)), tenant)
  end
end

-- Grants whose task never ended (the backstop: a task that settles gives its grant back).
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 64)
for _, grant in ipairs(expired) do end_grant(grant, false, nil) end

-- Saturated while tenants wait for the pool, and for a while after a delivery found the broker
-- backlogged (so that publishers, which read this flag now and then, start keeping tasks out of
-- the broker before anything waits).
local waiting = redis.call('ZCARD', KEYS[2])
if ARGV[F.saturate] == '1' then
  redis.call('HSET', KEYS[6], 'backlog_until', now + BACKLOG_HOLD_MS)
end
local saturated = (waiting > 0 or num(KEYS[6], 'backlog_until', 0) > now) and 1 or 0
redis.call('HSET', KEYS[6], 'saturated', saturated)

-- The pool's capacity: the policy's, or its live workers' pool sizes.
local capacity = tonumber(ARGV[F.capacity])
if not capacity then
  capacity = 0
  local entries = redis.call('HGETALL', KEYS[1])
  for i = 1, #entries, 2 do
    local size, expires = string.match(entries[i + 1], '^(%d+):(%d+)$')
    if size and tonumber(expires) > now then capacity = capacity + tonumber(size) end
  end
end
local in_flight = redis.call('ZCARD', KEYS[4])
local reply = {saturated = saturated, capacity = capacity, in_flight = in_flight, n = 0}
if ARGV[F.dispatch] ~= '1' or waiting == 0 or capacity == 0 then return cjson.encode(reply) end

-- The tenant furthest below its fair share, passing over those its own limits block (a few at
-- the head at most: each is unblocked when one of its tasks ends).
local head = redis.call('ZRANGE', KEYS[2], 0, BLOCKED_SCAN - 1, 'WITHSCORES')
local tenant, start
for i = 1, #head, 2 do
  if not redis.call('HGET', KEYS[3], head[i] .. ':b') then
    tenant, start = head[i], tonumber(head[i + 1])
    break
  end
end
if not tenant then return cjson.encode(reply) end
local run_ms = tenant_num(tenant, 'ms', tonumber(ARGV[F.default_run_ms]))
local cost = tenant_num(tenant, 'c', tonumber(ARGV[F.default_cost]))
local slack_ms, prefetch = tonumber(ARGV[F.slack_ms]), tonumber(ARGV[F.prefetch])
local bound = capacity + math.max(capacity * prefetch,
  math.ceil(capacity * slack_ms / math.max(run_ms, 1)))
local free = bound - in_flight
if free <= 0 then return cjson.encode(reply) end
local n = math.max(1, math.min(free, math.floor(slack_ms / math.max(run_ms, 1))))

vtime = math.max(vtime, start)
redis.call('HSET', KEYS[6], 'vtime', tostring(vtime))
local finish = start + n * cost / weight(tenant)
redis.call('HSET', KEYS[3], tenant .. ':f', tostring(finish))
redis.call('ZADD', KEYS[2], finish, tenant)
local seq = redis.call('HINCRBY', KEYS[6], 'seq', n)
local grants = {}
local expiry = now + tonumber(ARGV[F.grant_ttl_ms])
for i = 1, n do
  local grant = tenant .. ':' .. (seq - n + i)
  redis.call('ZADD', KEYS[4], expiry, grant)
  redis.call('HSET', KEYS[5], grant, tenant .. '|' .. tostring(cost))
  grants[i] = grant
end
reply.tenant, reply.grants, reply.n, reply.in_flight = tenant, grants, n, in_flight + n
return cjson.encode(reply)
