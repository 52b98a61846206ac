-- grant_revoke.lua: remove a grant, atomically with its audit entry (lib.lua is prepended).
--
-- KEYS[1..7] the tenant's shared keys (see lib.lua)
-- KEYS[8]    grants   HASH grant id -> JSON
--
-- ARGV (vocabulary.GRANT_REVOKE): the grant's id, the audit fields of the entry (`F.au`: tenant,
-- reviewer, policy version, ...); then the seals and the writer's id.
--
-- Returns JSON {removed = 0 | 1, au}.

L.seal(ARGV[F.seals], ARGV[F.writer])
local now = L.now_ms()
local written = {}
local id = ARGV[F.id]
local removed = redis.call('HDEL', KEYS[8], id)
if removed == 1 then
  L.task_entry(written, now, L.template(ARGV, F.au), AT.grant_revoked, '', '', {grant = id})
end
return cjson.encode({removed = removed, au = written})
