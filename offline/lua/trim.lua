-- Drop a user's entries older than the retention, or acknowledged by every device; the floor
-- moves past what was dropped.
-- KEYS[1] sync hash, KEYS[2] log; ARGV[1] cutoff (unix ms), ARGV[2] version every device has
-- acknowledged (0: keep), ARGV[3] most entries examined. Returns the number dropped.
local state, log = KEYS[1], KEYS[2]
if redis.call('EXISTS', state) == 0 then
  -- A log without its hash was orphaned by an expiry: nothing can serve it.
  return redis.call('DEL', log) * -1
end
local cutoff, acked, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local dropped, top = 0, nil
while dropped < budget do
  local batch = redis.call('ZRANGE', log, 0, 99, 'WITHSCORES')
  if #batch == 0 then break end
  local stop = false
  for i = 1, #batch, 2 do
    local ms = tonumber(string.match(batch[i], '^%d+|(%d+)|'))
    local version = tonumber(batch[i + 1])
    if ms < cutoff or version <= acked then
      top, dropped = version, dropped + 1
    else
      stop = true
      break
    end
  end
  if top then redis.call('ZREMRANGEBYSCORE', log, '-inf', top) end
  if stop then break end
end
if top and top > tonumber(redis.call('HGET', state, 'floor') or 0) then
  redis.call('HSET', state, 'floor', top)
end
return dropped
