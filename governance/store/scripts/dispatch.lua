-- dispatch.lua: fair dispatch reached this tenant: the worker pool of its queue gave it
-- capacity (pool_dispatch.lua), one grant per task. The tenant's oldest waiting tasks that fit
-- its own limits are handed on, each admitted on its behalf and carrying a grant, in one atomic
-- call on the tenant's slot (lib.lua is prepended); the caller publishes them with their tokens.
-- Grants the tenant cannot use (its wait list empty, or its own limits in the way: concurrency,
-- a pause) go back to the pool with the caller's next call.
--
-- KEYS[1..7]  the tenant's shared keys (see lib.lua)
--
-- ARGV (vocabulary.DISPATCH): grants (JSON list), the pool's queue (only its tasks are handed
-- on), the caller's policy version; then the
-- settings (`G`), the seals and the writer's id.
--
-- Returns JSON {pub = [{id, msg, token}], au = [...], used (grants used, in order), left (tasks
-- still waiting), blocked (1: a limit of the tenant stopped the walk)}.

local G = read_settings(ARGV)
L.seal(ARGV[F.seals], ARGV[F.writer])
local now = L.now_ms()
local written, publish = {}, {}
local grants = json(ARGV[F.grants]) or {}
local out = {pub = publish, written = written, grants = grants, queue = ARGV[F.queue]}
local used = 0
if #grants > 0 and redis.call('ZCARD', L.T.waiting) > 0 then
  L.load_admission(true)
  used = L.handoff(now, G, out, text(ARGV[F.policy_version]))
end
return cjson.encode({pub = publish, au = written, used = used,
  left = redis.call('ZCARD', L.T.waiting), blocked = out.blocked and 1 or 0})
