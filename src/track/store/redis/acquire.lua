-- KEYS[1] = the key's sorted set; ARGV = member, limit, ttl ms, then members of this
-- instance whose release is still queued (removed first, so a release is effective at once).
-- Returns {granted (0|1), redis now ms, leases held after the call}.
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = KEYS[1]
local ttl = tonumber(ARGV[3])
for i = 4, #ARGV do redis.call('ZREM', key, ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local n = redis.call('ZCARD', key)
if n >= tonumber(ARGV[2]) then return {0, now, n} end
redis.call('ZADD', key, now + ttl, ARGV[1])
-- Only ever move the key's expiry later: a process with a shorter lease_ttl on the same
-- prefix must not cut another's leases short (PTTL is -1 for a key without expiry).
if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
return {1, now, n + 1}
