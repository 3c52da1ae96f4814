-- Publishes a stored batch and acknowledges its entries, for the lease holder only: a
-- persister that lost the partition can never publish or acknowledge for it.
-- KEYS[1] the stream; KEYS[2] the lease; KEYS[3] the rooms' removal counts; KEYS[4..]
-- the rooms' channels (all in one slot).
-- ARGV[1] the holder; ARGV[2] group; ARGV[3] how many channels (n); ARGV[4..3+n] one
-- payload per channel, each ending in '"membersVersion":0}}'; ARGV[4+n..3+2n] the room of
-- each channel; ARGV[4+2n..] the entry ids.
-- Returns -1 when the lease is not ours, else the number of entries acknowledged.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return -1
end
local n = tonumber(ARGV[3])
local placeholder = '"membersVersion":0}}'
for i = 1, n do
  local payload = ARGV[3 + i]
  -- The room's removal count as of this publication, in place of the placeholder.
  local count = redis.call('HGET', KEYS[3], ARGV[3 + n + i])
  if count and string.sub(payload, -#placeholder) == placeholder then
    payload = string.sub(payload, 1, -4) .. count .. '}}'
  end
  redis.call('SPUBLISH', KEYS[3 + i], payload)
end
local acked = 0
local ids = {}
local function flush()
  if #ids > 0 then
    acked = acked + redis.call('XACK', KEYS[1], ARGV[2], unpack(ids))
    -- One group reads each stream: an acknowledged entry is not needed again.
    redis.call('XDEL', KEYS[1], unpack(ids))
    ids = {}
  end
end
for i = 4 + 2 * n, #ARGV do
  ids[#ids + 1] = ARGV[i]
  -- unpack() is bounded by Lua's stack; acknowledge in chunks.
  if #ids == 1000 then
    flush()
  end
end
flush()
return acked
