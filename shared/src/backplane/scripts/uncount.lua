-- Takes one back from a fixed-window counter, if it still exists (DECR on an expired
-- counter would create one without a window). KEYS[1] the counter. Returns the count.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('DECR', KEYS[1])
end
return 0
