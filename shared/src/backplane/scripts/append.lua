-- Appends a message to an ingest partition with the next sequence number of its room, at
-- most once per idempotency key and only while the partition's backlog is under its bound.
-- KEYS[1] the partition stream; KEYS[2] the partition's room sequence counters (a hash);
-- KEYS[3] (optional) the idempotency key; all in one slot.
-- ARGV[1] message JSON; ARGV[2] most entries; ARGV[3] "<id> <millis>" of the message;
-- ARGV[4] seconds to remember the idempotency key; ARGV[5] the room id.
-- Returns {0, seq} when appended, {1, "<id> <millis> <seq>"} for a key seen before,
-- {2, entries} when the backlog is full, {3, ""} when the room's counter is unknown (it
-- must be seeded from the store first: Redis never held it, or lost it).
if #KEYS > 2 then
  local prior = redis.call('GET', KEYS[3])
  if prior then
    return {1, prior}
  end
end
local entries = redis.call('XLEN', KEYS[1])
if entries >= tonumber(ARGV[2]) then
  return {2, entries}
end
if redis.call('HEXISTS', KEYS[2], ARGV[5]) == 0 then
  return {3, ''}
end
local seq = redis.call('HINCRBY', KEYS[2], ARGV[5], 1)
redis.call('XADD', KEYS[1], '*', 'm', ARGV[1], 's', seq)
if #KEYS > 2 then
  redis.call('SET', KEYS[3], ARGV[3] .. ' ' .. seq, 'EX', ARGV[4])
end
return {0, seq}
