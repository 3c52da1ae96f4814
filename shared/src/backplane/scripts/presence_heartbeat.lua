-- A gateway's presence heartbeat: marks the instance live until now + ttl, moves every
-- instance whose heartbeat expired to the dead set (its entries are then taken offline by
-- whichever gateway reaps first), and answers {listed, dead...}: listed is 0 when this
-- instance was no longer live (it was itself found dead, its entries taken away).
-- KEYS[1] the live sorted set; KEYS[2] the dead set.
-- ARGV[1] the instance; ARGV[2] ttl in milliseconds; ARGV[3] '1' on the first heartbeat.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, instance in ipairs(expired) do
  if instance ~= ARGV[1] then
    redis.call('ZREM', KEYS[1], instance)
    redis.call('SADD', KEYS[2], instance)
  end
end
local listed = 1
if ARGV[3] ~= '1' and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  -- Found dead meanwhile: the instance name is spent; the gateway comes back under a new one.
  listed = 0
else
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
end
local reply = redis.call('SMEMBERS', KEYS[2])
table.insert(reply, 1, listed)
return reply
