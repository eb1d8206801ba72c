-- Note that a device is here; PostgreSQL's last_seen_at gets it with the next ack flush.
-- KEYS[1] pending last-seen hash, KEYS[2] the one being flushed; ARGV[1] device pk,
-- ARGV[2] now (unix ms). Returns the previous time not yet in PostgreSQL (unix ms) or false.
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
local flushing = tonumber(redis.call('HGET', KEYS[2], ARGV[1]))
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if flushing and (not old or flushing > old) then old = flushing end
if old then return string.format('%d', old) end
return false
