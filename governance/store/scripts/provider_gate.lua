-- provider_gate.lua: may a call go to a provider shared by the whole deployment, now? (Standalone:
-- its keys are in the provider's cluster slot, not a tenant's, so the tenant's admission runs
-- after it, in a call of its own.) When the provider is cooling down, or its rate has no token
-- now, it answers the earliest time the call may go, and takes nothing; when it may go now, it
-- takes the rate token at once, so concurrent callers of every tenant never exceed the rate. A
-- token taken for a call that the tenant's admission then makes wait is lost: the provider's
-- limit is never exceeded, it may be under-used.
--
-- KEYS[1] provider cooldown   STRING until (ms)
-- KEYS[2] provider rate       STRING theoretical arrival time (ms)
-- ARGV (vocabulary.PROVIDER_GATE): rate_interval_ms, rate_burst ('': no provider-wide rate)
--
-- Returns JSON {turn = 0 (go now; token taken) | earliest ms, v = cooldown | rate_limit:provider,
--   wait = ms}

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local until_ms = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ms > now then
  return cjson.encode({turn = until_ms, v = 'cooldown', wait = until_ms - now})
end
if ARGV[F.rate_interval_ms] == '' then return cjson.encode({turn = 0}) end

local interval, burst = tonumber(ARGV[F.rate_interval_ms]), tonumber(ARGV[F.rate_burst])
local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
-- GCRA, as the tenant's rates (lib.lua): the earliest conforming time of one more call.
local at = math.max(now, tat + interval - burst * interval)
if at > now then
  return cjson.encode({turn = math.floor(at), v = 'rate_limit:provider',
    wait = math.floor(at - now)})
end
local new_tat = math.max(tat, at) + interval
redis.call('SET', KEYS[2], math.floor(new_tat), 'PX', math.max(1, math.ceil(new_tat - now)) + 1000)
return cjson.encode({turn = 0})
