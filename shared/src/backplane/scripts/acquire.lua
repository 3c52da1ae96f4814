-- Takes a free partition lease with a new fencing token.
-- KEYS[1] the lease; KEYS[2] the fencing token counter (same slot).
-- ARGV[1] the instance; ARGV[2] the lease time in milliseconds.
-- Returns the token, or false when another instance holds the lease.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return false
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. token, 'PX', ARGV[2])
return token
