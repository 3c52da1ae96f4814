-- Marks a user online (ARGV[3] = '1') or offline in a room for one gateway instance, and
-- publishes a presence change when the user's state across all gateways changed: online
-- when the first gateway holds them, offline when the last one let go. A second run of the
-- same call changes nothing and publishes nothing (the Redis client may send a command
-- twice), so the room never hears the same state twice in a row.
-- KEYS[1] the room's presence hash; KEYS[2] the room's channel.
-- ARGV[1] gateway instance; ARGV[2] user id; ARGV[3] '1' or '0';
-- ARGV[4] the online payload; ARGV[5] the offline payload.
local field = ARGV[1] .. ' ' .. ARGV[2]
local users = 'u:' .. ARGV[2]
if ARGV[3] == '1' then
  if redis.call('HSETNX', KEYS[1], field, '1') == 1 then
    if redis.call('HINCRBY', KEYS[1], users, 1) == 1 then
      redis.call('SPUBLISH', KEYS[2], ARGV[4])
      return 1
    end
  end
elseif redis.call('HDEL', KEYS[1], field) == 1 then
  if redis.call('HINCRBY', KEYS[1], users, -1) <= 0 then
    redis.call('HDEL', KEYS[1], users)
    redis.call('SPUBLISH', KEYS[2], ARGV[5])
    return 1
  end
end
return 0
