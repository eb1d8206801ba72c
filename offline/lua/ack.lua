-- Absorb one cumulative ack (delayed ack: PostgreSQL gets them later, in one batch).
-- KEYS[1] pending acks, KEYS[2] flush flag
-- ARGV[1] device pk, ARGV[2] version, ARGV[3] flush threshold (pending devices), ARGV[4] flag ms
-- Returns {highest pending version of the device, 1 when the caller should send a flush}.
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1])) or 0
local v = tonumber(ARGV[2])
if v > old then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  old = v
end
local flush = 0
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  if redis.call('SET', KEYS[2], 1, 'NX', 'PX', ARGV[4]) then flush = 1 end
end
return {old, flush}
