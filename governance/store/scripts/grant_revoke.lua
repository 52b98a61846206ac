-- grant_revoke.lua: remove a grant, atomically with its audit entry (lib.lua is prepended).
--
-- KEYS[1..7] the tenant's shared keys (see lib.lua)
-- KEYS[8]    grants   HASH grant id -> JSON
--
-- ARGV[1] JSON {id, au (audit fields: reviewer, reason, ...)}
-- ARGV[2] seals (JSON)   ARGV[3] the writer's id
--
-- Returns JSON {removed = 0 | 1, au}.

local P = cjson.decode(ARGV[1])
L.seal(ARGV[2], ARGV[3])
local now = L.now_ms()
local written = {}
local removed = redis.call('HDEL', KEYS[8], P.id)
if removed == 1 then
  local fields = {}
  for name, value in pairs(P.au) do fields[name] = value end
  fields.type = 'grant_revoked'
  fields.detail = cjson.encode({grant = P.id})
  L.audit(written, now, fields)
end
return cjson.encode({removed = removed, au = written})
