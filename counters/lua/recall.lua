--[[ recall: a message the user may count was recalled; it counts no more.
KEYS[1]  the user's counter hash, imc:{u:<id>}:ctr
ARGV[1]  conversation id
ARGV[2]  the recalled message's seq
At or below the read pointer it changes nothing (a read message loses nothing). Above it, the
seq joins x:<cid> (once: a second call changes nothing) and the top rises to it if lower (what
the message's own count would do; so every seq of x:<cid> is at or below the top, and an
increment arriving later counts the rest), the unread becomes t - r - #x, and a mention of
the message goes. Like ``inc``, a membership Redis never heard of marks the hash for a rebuild.
Returns  the change of the badge. ]]
local h = KEYS[1]
local c = ARGV[1]
local seq = tonumber(ARGV[2])
if redis.call('HEXISTS', h, 'ready') == 1 and redis.call('HEXISTS', h, 'v:' .. c) == 0 then
  redis.call('HDEL', h, 'ready')
end
local r = tonumber(redis.call('HGET', h, 'r:' .. c) or 0)
if seq <= r then return 0 end
local cur = redis.call('HGET', h, 'x:' .. c)
if cur then
  for s in string.gmatch(cur, '%d+') do
    if tonumber(s) == seq then return 0 end
  end
end
local x = store_recalled(h, c, tostring(seq), r)
local t = tonumber(redis.call('HGET', h, 't:' .. c) or 0)
if seq > t then
  t = seq
  redis.call('HSET', h, 't:' .. c, t)
end
store_mentions(h, c, nil, r)
local unread = redis.call('HGET', h, 'u:' .. c)
if not unread then return 0 end
local n = math.max(t - r - x, 0)
local d = n - tonumber(unread)
if d == 0 then return 0 end
redis.call('HSET', h, 'u:' .. c, n)
if redis.call('HGET', h, 'm:' .. c) == '1' then return 0 end
redis.call('HINCRBY', h, 'badge', d)
return d
