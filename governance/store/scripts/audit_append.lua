-- audit_append.lua: append entries to the hash-chained audit stream, but only if the chain head
-- is still the one the caller computed the entries' hashes from (compare-and-set). The HMACs are
-- computed by the caller, who holds the key; on a lost race it gets the current head and retries.
--
-- KEYS[1] audit stream        STREAM
-- KEYS[2] chain head          STRING hash of the newest entry
--
-- ARGV[1] expected head ('' for an empty chain)
-- ARGV[2] approximate max length of the stream
-- ARGV[3] the entries, as one JSON array: [[hash, [field, value, field, value, ...]], ...]
--         (the prev and hash fields included)
--
-- Returns {1, id_1, ..., id_N} on success, {0, current_head} when the head moved.

local head = redis.call('GET', KEYS[2]) or ''
if head ~= ARGV[1] then return {0, head} end
local ids = {1}
for _, entry in ipairs(cjson.decode(ARGV[3])) do
  ids[#ids + 1] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(entry[2]))
  head = entry[1]
end
redis.call('SET', KEYS[2], head)
return ids
