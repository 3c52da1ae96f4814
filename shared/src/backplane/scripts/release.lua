-- Deletes a lease if it is still ours. KEYS[1] the lease; ARGV[1] its holder.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
