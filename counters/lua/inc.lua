--[[ inc: count new messages for one user.
KEYS[1]  the user's counter hash, imc:{u:<id>}:ctr
ARGV     pairs: conversation id, seq (the highest message seq of that conversation to count);
         the seq may be followed by ":" and the comma-separated seqs of this batch's
         messages that mention the user ("12:10,12"), which join n:<cid> unless they are at
         or below the read pointer or there already (so a mention is counted once)
Returns  the change of the badge.

Idempotent and order-free: a conversation's top (t:) only moves up, so an event applied
twice, or after a newer one, or after a mark-read past it, changes nothing. The top is
recorded even where Redis holds no unread for the conversation (not loaded after a wipe, or
a join not applied yet): the load or join that follows takes the max, so a message counted
in that window is not lost. Only the caller's members are sent here (PostgreSQL's list). ]]
local h = KEYS[1]
local ready = redis.call('HEXISTS', h, 'ready') == 1
local delta = 0
for i = 1, #ARGV, 2 do
  local c = ARGV[i]
  local seq = tonumber(ARGV[i + 1])
  local mentions
  if not seq then
    local top_arg, csv = string.match(ARGV[i + 1], '^(%d+):([%d,]*)$')
    seq, mentions = tonumber(top_arg), csv
  end
  if ready and redis.call('HEXISTS', h, 'v:' .. c) == 0 then
    -- PostgreSQL says member, Redis never heard of the join (in flight, or lost after its
    -- commit): the next read rebuilds this user from the truth.
    redis.call('HDEL', h, 'ready')
    ready = false
  end
  local top = tonumber(redis.call('HGET', h, 't:' .. c) or 0)
  if seq > top then
    redis.call('HSET', h, 't:' .. c, seq)
    local unread = redis.call('HGET', h, 'u:' .. c)
    if unread then
      local n = seq - tonumber(redis.call('HGET', h, 'r:' .. c) or 0)
        - seqs_count(redis.call('HGET', h, 'x:' .. c))
      if n < 0 then n = 0 end
      local d = n - tonumber(unread)
      if d ~= 0 then
        redis.call('HSET', h, 'u:' .. c, n)
        if redis.call('HGET', h, 'm:' .. c) ~= '1' then delta = delta + d end
      end
    end
  end
  if mentions and mentions ~= '' then
    store_mentions(h, c, mentions, tonumber(redis.call('HGET', h, 'r:' .. c) or 0))
  end
end
if delta ~= 0 then redis.call('HINCRBY', h, 'badge', delta) end
return delta
