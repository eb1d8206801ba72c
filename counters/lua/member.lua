--[[ member: apply a membership change (join, leave, mute, unmute) in commit order.
KEYS[1]  the user's counter hash, imc:{u:<id>}:ctr
ARGV[1]  conversation id
ARGV[2]  rev of the membership row after the change (grows with every change)
ARGV[3]  "1" active, "0" left
ARGV[4]  "1" muted, "0" not
ARGV[5]  the membership's last_read_seq
ARGV[6]  the conversation's last seq at the change
A join keeps only the mentions above its read pointer; a leave deletes them.
Returns  the change of the badge. A change whose rev is not newer than the one applied
         already is ignored, so changes reaching Redis out of order still end as committed. ]]
local h = KEYS[1]
local c = ARGV[1]
local rev = tonumber(ARGV[2])
if rev <= tonumber(redis.call('HGET', h, 'v:' .. c) or 0) then return 0 end
redis.call('HSET', h, 'v:' .. c, rev)
local old = 0
local unread = redis.call('HGET', h, 'u:' .. c)
if unread and redis.call('HGET', h, 'm:' .. c) ~= '1' then old = tonumber(unread) end
local new = 0
if ARGV[3] == '1' then
  local r = math.max(tonumber(redis.call('HGET', h, 'r:' .. c) or 0), tonumber(ARGV[5]))
  local t = math.max(tonumber(redis.call('HGET', h, 't:' .. c) or 0), tonumber(ARGV[6]), r)
  redis.call('HSET', h, 'r:' .. c, r, 't:' .. c, t, 'u:' .. c, t - r, 'm:' .. c, ARGV[4])
  store_mentions(h, c, nil, r)
  if ARGV[4] ~= '1' then new = t - r end
else
  redis.call('HDEL', h, 'u:' .. c, 'r:' .. c, 't:' .. c, 'm:' .. c, 'n:' .. c)
end
local d = new - old
if d ~= 0 then redis.call('HINCRBY', h, 'badge', d) end
return d
