-- Schedule a push for offline devices: at most one per device per interval, and an alert wins
-- over a silent badge update. The push is sent (with the badge of that moment) when due.
-- KEYS[1] due ZSET (device pk -> unix ms), KEYS[2] kind HASH, KEYS[3] last-sent HASH
-- ARGV[1] now (ms), ARGV[2] interval (ms), then pairs: device pk, 1 alert / 0 silent.
local now, interval = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 3, #ARGV, 2 do
  local dev = ARGV[i]
  local due = (tonumber(redis.call('HGET', KEYS[3], dev)) or 0) + interval
  if due < now then due = now end
  redis.call('ZADD', KEYS[1], 'NX', due, dev)
  if ARGV[i + 1] == '1' then
    redis.call('HSET', KEYS[2], dev, 'alert')
  else
    redis.call('HSETNX', KEYS[2], dev, 'silent')
  end
end
return 1
