-- Extends a lease if it is still ours.
-- KEYS[1] the lease; ARGV[1] its holder ("<instance> <token>"); ARGV[2] milliseconds.
-- Returns 1 when renewed, 0 when lost.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
