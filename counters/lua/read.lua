--[[ read: mark one conversation read for one user, at once.
KEYS[1]  the user's counter hash, imc:{u:<id>}:ctr
ARGV[1]  conversation id
ARGV[2]  read seq (the new last_read_seq; the pointer never moves back)
ARGV[3]  the conversation's last seq when the read was committed (the top moves up to it)
The mentions and recalled seqs at or below the new read pointer are dropped.
Returns  {unread, badge}: the unread as of ARGV[3] and the stored badge (a conversation in
         channel form is not in it: the caller adds the channel-form ones when it reads)
         {-1, 0} when the hash is not loaded (the caller rebuilds and calls again)
         {-2, 0} when Redis does not know the user as a member (the caller rebuilds) ]]
local h = KEYS[1]
local c = ARGV[1]
if redis.call('HEXISTS', h, 'ready') == 0 then return {-1, 0} end
local unread = redis.call('HGET', h, 'u:' .. c)
local channel = redis.call('HEXISTS', h, 'c:' .. c) == 1
if not unread and not channel then return {-2, 0} end
local r = math.max(tonumber(redis.call('HGET', h, 'r:' .. c) or 0), tonumber(ARGV[2]))
local t = math.max(tonumber(redis.call('HGET', h, 't:' .. c) or 0), tonumber(ARGV[3]), r)
redis.call('HSET', h, 'r:' .. c, r, 't:' .. c, t)
local n = math.max(t - r - store_recalled(h, c, nil, r), 0)
store_mentions(h, c, nil, r)
if channel then
  return {n, tonumber(redis.call('HGET', h, 'badge') or 0)}
end
redis.call('HSET', h, 'u:' .. c, n)
local d = n - tonumber(unread)
local badge
if d ~= 0 and redis.call('HGET', h, 'm:' .. c) ~= '1' then
  badge = redis.call('HINCRBY', h, 'badge', d)
else
  badge = tonumber(redis.call('HGET', h, 'badge') or 0)
end
return {n, badge}
