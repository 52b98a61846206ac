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
-- ARGV (vocabulary.AUDIT_APPEND): the entries (JSON [{field: value, ...}, ...]), with KEYS[8] the
-- seconds the ended record is kept; then the seals of this writer's earlier entries and the
-- writer's id.
--
-- Returns JSON {au = [[stream id, [field, value, ...]], ...]}.

L.seal(ARGV[F.seals], ARGV[F.writer])
local now = L.now_ms()
local written = {}
for _, fields in ipairs(json(ARGV[F.entries]) or {}) do L.audit(written, now, fields) end
local rec = KEYS[8]
if rec and redis.call('EXISTS', rec) == 1 and redis.call('HGET', rec, 'where') ~= 'done'
    and not L.running_live(rec, now) then
  L.end_record(rec, now, tonumber(ARGV[F.record_ttl]))
end
return cjson.encode({au = written})
