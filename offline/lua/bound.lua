-- Record a bound PostgreSQL has stored (never lowers it).
-- KEYS[1] sync hash; ARGV[1] run_id, ARGV[2] bound. Returns 1, or -1 when not loaded here.
if redis.call('HGET', KEYS[1], 'rid') ~= ARGV[1] then return -1 end
local old = tonumber(redis.call('HGET', KEYS[1], 'bound')) or 0
if tonumber(ARGV[2]) > old then redis.call('HSET', KEYS[1], 'bound', ARGV[2]) end
return 1
