-- release_consume.lua: the worker checks a release token against the held task. Valid only for
-- a released task whose stored token hash matches. The token stays valid for the same task id
-- (its later deliveries: a wait, a hand-off, a retry), because the ledger runs a task id at most
-- once per attempt; a copy under another task id fails the token's HMAC before it gets here.
--
-- KEYS[1] held task   HASH
-- ARGV[1] hash of the presented release token
--
-- Returns 1 when the token is the task's current release token, 0 otherwise.

if redis.call('HGET', KEYS[1], 'status') ~= 'released'
    or redis.call('HGET', KEYS[1], 'token_hash') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'token_used', 1)
return 1
