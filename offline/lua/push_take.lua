-- Take the pushes that are due, and note them as sent now (the interval starts again).
-- KEYS as push_schedule.lua; ARGV[1] now (ms), ARGV[2] most to take.
-- Returns a flat list: device pk, kind, ...
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
for _, dev in ipairs(due) do
  out[#out + 1] = dev
  out[#out + 1] = redis.call('HGET', KEYS[2], dev) or 'silent'
  redis.call('ZREM', KEYS[1], dev)
  redis.call('HDEL', KEYS[2], dev)
  redis.call('HSET', KEYS[3], dev, ARGV[1])
end
return out
