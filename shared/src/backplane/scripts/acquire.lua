-- Takes a free partition lease with a new fencing token.
-- KEYS[1] the lease; KEYS[2] the fencing token counter (same slot).
-- ARGV[1] the instance; ARGV[2] the lease time in milliseconds.
-- Returns the token, or false when another instance holds the lease. A lease this instance
-- holds already is answered with its token: that is a second run of the same acquisition
-- (the client library sends a script again when the first run's reply was lost).
local held = redis.call('GET', KEYS[1])
if held then
  local prefix = ARGV[1] .. ' '
  if string.sub(held, 1, #prefix) == prefix then
    return tonumber(string.sub(held, #prefix + 1))
  end
  return false
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. token, 'PX', ARGV[2])
return token
