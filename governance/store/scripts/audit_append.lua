-- audit_append.lua: append entries to a tenant's audit chain (lib.lua is prepended): for records
-- that are not part of an admission or a settlement (a denial at publish time, a task lost by
-- the ledger). Each entry gets the chain's next sequence number and the server time; the caller
-- seals them with its key afterwards (in its next call, or at once with `seal_only`).
--
-- KEYS[1..7] the tenant's shared keys (see lib.lua)
-- KEYS[8]    optional: the ledger record of the task these entries end on the worker without
--            running it (denied, shadowed). Ended with them, in the same call: it lets go of
--            what it held or waited for and leaves the ledger, unless it is done already or a
--            live delivery runs it (this one was a copy).
--
-- ARGV[1] the entries (JSON [{field: value, ...}, ...])
-- ARGV[2] seals of this writer's earlier entries (JSON [[seq, mac], ...])
-- ARGV[3] the writer's id
-- ARGV[4] with KEYS[8]: seconds the ended record is kept
--
-- Returns JSON {au = [[stream id, [field, value, ...]], ...]}.

L.seal(ARGV[2], ARGV[3])
local now = L.now_ms()
local written = {}
for _, fields in ipairs(cjson.decode(ARGV[1])) do L.audit(written, now, fields) end
local rec = KEYS[8]
if rec and redis.call('EXISTS', rec) == 1 and redis.call('HGET', rec, 'where') ~= 'done'
    and not L.running_live(rec, now) then
  L.end_record(rec, now, tonumber(ARGV[4]))
end
return cjson.encode({au = written})
