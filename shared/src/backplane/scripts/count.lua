-- Adds one to a fixed-window counter; the window starts with its first count.
-- KEYS[1] the counter; ARGV[1] the window in milliseconds. Returns the new count.
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return n
