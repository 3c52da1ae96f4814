-- Numbers a room's entries again when their numbers are taken in the store already: Redis's
-- counter fell behind what was stored (a failover to a replica that missed the last writes,
-- or an append-only file that lost its last second), so new messages were given numbers that
-- earlier, stored messages hold. For the lease holder only.
-- The room's counter is set to the store's latest number, then every entry of the room
-- from the first such entry to the end of the stream is appended again with the next
-- number, in order, and the original is acknowledged and deleted. Those are all of the
-- room's entries numbered from the first taken number up to the counter, so the counter
-- ends higher than it was; entries appended after this script get numbers after those, and
-- the room keeps the order its messages were accepted in, with no number left out.
-- KEYS[1] the stream; KEYS[2] the lease; KEYS[3] the room counters; KEYS[4] this
-- renumbering's record (a second run of the script answers from it instead of moving the
-- copies again).
-- ARGV[1] the holder; ARGV[2] group; ARGV[3] the room id; ARGV[4] the first entry to move;
-- ARGV[5] the store's latest number in the room; ARGV[6] seconds to keep the record;
-- ARGV[7] the prefix of the messages' own keys (the append script's), whose numbers follow.
-- Returns -1 when the lease is not ours; else "<last entry looked at> <entries moved>".
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return -1
end
local done = redis.call('GET', KEYS[4])
if done then
  return done
end
local room = ARGV[3]
redis.call('HSET', KEYS[3], room, ARGV[5])
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #newest == 0 then
  redis.call('SET', KEYS[4], '0-0 0', 'EX', ARGV[6])
  return '0-0 0'
end
local upto = newest[1][1]
local moved = 0
local from = ARGV[4]
while true do
  local chunk = redis.call('XRANGE', KEYS[1], from, upto, 'COUNT', 500)
  if #chunk == 0 then
    break
  end
  for _, entry in ipairs(chunk) do
    local id, fields = entry[1], entry[2]
    local f = {}
    for i = 1, #fields, 2 do
      f[fields[i]] = fields[i + 1]
    end
    -- Entries carry their room; those appended before they did say it in the message.
    -- An entry that cannot be decoded is left where it is (the persister drops it).
    local message = nil
    if f['m'] and (f['r'] == room or (not f['r'] and string.find(f['m'], room, 1, true))) then
      local decoded, value = pcall(cjson.decode, f['m'])
      if decoded and type(value) == 'table' then
        message = value
      end
    end
    if message and message['roomId'] == room and type(message['id']) == 'string' then
      local seq = redis.call('HINCRBY', KEYS[3], room, 1)
      redis.call('XADD', KEYS[1], '*', 'm', f['m'], 's', seq, 'r', room)
      redis.call('XACK', KEYS[1], ARGV[2], id)
      redis.call('XDEL', KEYS[1], id)
      local own = ARGV[7] .. message['id']
      if redis.call('EXISTS', own) == 1 then
        redis.call('SET', own, seq, 'KEEPTTL')
      end
      moved = moved + 1
    end
  end
  from = '(' .. chunk[#chunk][1]
end
local result = upto .. ' ' .. moved
redis.call('SET', KEYS[4], result, 'EX', ARGV[6])
return result
