-- Note that a device is here; PostgreSQL's last_seen_at gets it with the next ack flush.
-- KEYS[1] pending last-seen hash; ARGV[1] device pk, ARGV[2] now (unix ms).
-- Returns the previous pending time (unix ms) or false.
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return old
