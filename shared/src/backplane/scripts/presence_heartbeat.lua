-- A gateway's presence heartbeat: marks the instance live until now + ttl, moves every
-- instance whose heartbeat expired to the dead set (its entries are then taken offline by
-- the live gateways), and answers {listed, dead...}. listed is 0 when this instance had
-- been found dead meanwhile (paused past its heartbeat): its name is spent, and the
-- replacement name ARGV[4] is registered live in its place, in this same call, so that
-- nothing is ever written under a name no one would reap.
-- KEYS[1] the live sorted set; KEYS[2] the dead set.
-- ARGV[1] the instance; ARGV[2] ttl in milliseconds; ARGV[3] '1' on the first heartbeat;
-- ARGV[4] the name to go on under when this one is spent.
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
local name = ARGV[1]
if ARGV[3] ~= '1' and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  listed = 0
  name = ARGV[4]
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), name)
local reply = redis.call('SMEMBERS', KEYS[2])
table.insert(reply, 1, listed)
return reply
