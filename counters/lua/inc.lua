--[[ inc: count new messages for one user.
KEYS[1]  the user's counter hash, imc:{u:<id>}:ctr
ARGV     pairs: conversation id, seq (the highest message seq of that conversation to count)
Returns  the change of the badge.

Idempotent and order-free: a conversation's top (t:) only moves up, so an event applied
twice, or after a newer one, or after a mark-read past it, changes nothing. Conversations the
user is not a member of are ignored, except while the hash is not loaded (after a wipe):
then the top is still recorded, so a rebuild racing with this event cannot lose it. ]]
local h = KEYS[1]
local ready = redis.call('HEXISTS', h, 'ready') == 1
local delta = 0
for i = 1, #ARGV, 2 do
  local c = ARGV[i]
  local seq = tonumber(ARGV[i + 1])
  local unread = redis.call('HGET', h, 'u:' .. c)
  if unread or not ready then
    local top = tonumber(redis.call('HGET', h, 't:' .. c) or 0)
    if seq > top then
      redis.call('HSET', h, 't:' .. c, seq)
      if unread then
        local n = seq - tonumber(redis.call('HGET', h, 'r:' .. c) or 0)
        if n < 0 then n = 0 end
        local d = n - tonumber(unread)
        if d ~= 0 then
          redis.call('HSET', h, 'u:' .. c, n)
          if redis.call('HGET', h, 'm:' .. c) ~= '1' then delta = delta + d end
        end
      end
    end
  end
end
if delta ~= 0 then redis.call('HINCRBY', h, 'badge', delta) end
return delta
