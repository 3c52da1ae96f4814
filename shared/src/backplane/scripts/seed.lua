-- Sets a room's sequence counter to the highest number the store holds, unless Redis has
-- one already (which is never lower: every stored number came from it).
-- KEYS[1] the partition's counters; ARGV[1] the room id; ARGV[2] the store's latest.
return redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
