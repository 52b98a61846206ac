-- release_consume.lua: the worker spends a release token, once. Valid only for a released task
-- whose stored token hash matches and that has not been spent; afterwards it never is again.
--
-- KEYS[1] held task   HASH
-- ARGV[1] hash of the presented release token
--
-- Returns 1 when the token was valid and is now spent, 0 otherwise.

if redis.call('HGET', KEYS[1], 'status') ~= 'released'
    or redis.call('HGET', KEYS[1], 'token_hash') ~= ARGV[1]
    or redis.call('HGET', KEYS[1], 'token_used') then
  return 0
end
redis.call('HSET', KEYS[1], 'token_used', 1)
return 1
