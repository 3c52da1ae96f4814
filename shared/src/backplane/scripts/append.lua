-- Appends a message to an ingest partition, at most once per idempotency key and only
-- while the partition's backlog is under its bound.
-- KEYS[1] the partition stream; KEYS[2] (optional) the idempotency key, same slot.
-- ARGV[1] message JSON; ARGV[2] most entries; ARGV[3] "<id> <millis>" to remember;
-- ARGV[4] seconds to remember it.
-- Returns {0, ""} when appended, {1, "<id> <millis>"} for a key seen before,
-- {2, <entries>} when the backlog is full.
if #KEYS > 1 then
  local prior = redis.call('GET', KEYS[2])
  if prior then
    return {1, prior}
  end
end
local entries = redis.call('XLEN', KEYS[1])
if entries >= tonumber(ARGV[2]) then
  return {2, entries}
end
redis.call('XADD', KEYS[1], '*', 'm', ARGV[1])
if #KEYS > 1 then
  redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
end
return {0, ''}
