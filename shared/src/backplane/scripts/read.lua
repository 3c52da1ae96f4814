-- Reads a partition for the lease holder only, so that a holder that lost its lease
-- cannot take entries into the group's pending list behind the new holder's back.
-- KEYS[1] the stream; KEYS[2] the lease; KEYS[3] the partition's count of reads.
-- ARGV[1] the holder; ARGV[2] group; ARGV[3] consumer; ARGV[4] count;
-- ARGV[5] the id of the last entry this holder received ("0" for none yet).
-- Entries handed out before and not received (a reply lost with its connection, or a new
-- holder taking over a dead one's) come first: those pending after ARGV[5]. Only when there
-- are none are new entries handed out. So a second run of the same read (the client library
-- sends a script again when its connection dropped with the reply in flight) returns what
-- the first run handed out, and nothing is left pending unseen.
-- A read that returns entries counts itself in KEYS[3]: a write, so that the `WAIT` the
-- persister sends after it on the same connection covers the entries (WAIT waits for the
-- connection's last write to reach the replicas; re-reading pending entries writes nothing).
-- Returns -1 when the lease is not ours; else {entries, last-delivered-id}, where entries
-- are [id, [field, value, ...]] and the id tells where to wait for new ones.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return -1
end
local function read(from)
  return redis.pcall('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4],
    'STREAMS', KEYS[1], from)
end
local reply = read(ARGV[5])
if type(reply) == 'table' and reply.err then
  if string.sub(reply.err, 1, 7) ~= 'NOGROUP' then
    return redis.error_reply(reply.err)
  end
  -- Redis lost the group (restarted without persistence): make it again.
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[2], '0', 'MKSTREAM')
  reply = read(ARGV[5])
end
local entries = {}
if reply and reply[1] then
  entries = reply[1][2]
end
if #entries == 0 then
  reply = read('>')
  if reply and reply[1] then
    entries = reply[1][2]
  end
end
if #entries > 0 then
  redis.call('INCR', KEYS[3])
end
local last = '0-0'
if #entries == 0 then
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local fields = {}
    for i = 1, #group, 2 do
      fields[group[i]] = group[i + 1]
    end
    if fields['name'] == ARGV[2] then
      last = fields['last-delivered-id']
    end
  end
end
return {entries, last}
