-- audit_append.lua: append entries to the hash-chained audit stream, but only if the chain head
-- is still the one the caller computed the entries' hashes from (compare-and-set). The HMACs are
-- computed by the caller, who holds the key; on a lost race it gets the current head and retries.
--
-- KEYS[1] audit stream        STREAM
-- KEYS[2] chain head          STRING hash of the newest entry
--
-- ARGV[1] expected head ('' for an empty chain)
-- ARGV[2] approximate max length of the stream
-- ARGV[3] number N of entries, then for each entry: its hash, its field count F, F field/value
--         pairs (the hash and prev fields included)
--
-- Returns {1, id_1, ..., id_N} on success, {0, current_head} when the head moved.

local head = redis.call('GET', KEYS[2]) or ''
if head ~= ARGV[1] then return {0, head} end
local ids = {1}
local i = 4
for _ = 1, tonumber(ARGV[3]) do
  local hash = ARGV[i]
  local count = tonumber(ARGV[i + 1])
  local args = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*'}
  for j = i + 2, i + 1 + 2 * count do args[#args + 1] = ARGV[j] end
  ids[#ids + 1] = redis.call(unpack(args))
  head = hash
  i = i + 2 + 2 * count
end
redis.call('SET', KEYS[2], head)
return ids
