-- Appends a message to an ingest partition with the next sequence number of its room, once
-- per message id and once per idempotency key, and only while the partition's backlog is
-- under its bound.
-- KEYS[1] the partition stream; KEYS[2] the partition's room sequence counters (a hash);
-- KEYS[3] the message's own key (its id); KEYS[4] (optional) the idempotency key of the
-- client's clientMsgId; all in one slot.
-- ARGV[1] message JSON; ARGV[2] most entries; ARGV[3] "<id> <millis>" of the message;
-- ARGV[4] seconds to remember the idempotency key; ARGV[5] the room id; ARGV[6] seconds to
-- remember the message's own key; ARGV[7] the content's hash.
-- Returns {0, seq} when appended; {4, seq} when this very message was appended before (the
-- client library sent the script again after a connection dropped with the first run's
-- reply in flight); {1, "<id> <millis> <seq> <hash>"} for an idempotency key seen before;
-- {2, entries} when the backlog is full; {3, ""} when the room's counter is unknown (it
-- must be seeded from the store first: Redis never held it, or lost it).
local own = redis.call('GET', KEYS[3])
if own then
  return {4, tonumber(own)}
end
if #KEYS > 3 then
  local prior = redis.call('GET', KEYS[4])
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
redis.call('XADD', KEYS[1], '*', 'm', ARGV[1], 's', seq, 'r', ARGV[5])
redis.call('SET', KEYS[3], seq, 'EX', ARGV[6])
if #KEYS > 3 then
  redis.call('SET', KEYS[4], ARGV[3] .. ' ' .. seq .. ' ' .. ARGV[7], 'EX', ARGV[4])
end
return {0, seq}
