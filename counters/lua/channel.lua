--[[ channel: a message committed in a conversation whose members' counters are in channel
form (a large group): the only write a plain message makes, whatever the group's size.
KEYS[1]  the conversation's channel hash, imc:{c:<cid>}:ch
KEYS[2]  its record of mention_all seqs, imc:{c:<cid>}:all (ZSET)
ARGV[1]  the message's seq (0: only make sure the top is at least ARGV[3])
ARGV[2]  "1" when the message mentions everyone
ARGV[3]  a top known from PostgreSQL (a conversion, or a read that found no top; 0: none)
The top only moves up, so the call is idempotent and order-free; ``ms`` is the server's time
(unix ms) of the last change of the top, for ``/sync``'s ``channels``.
Returns  the top after the call. ]]
local seq = math.max(tonumber(ARGV[1]), tonumber(ARGV[3] or 0))
local top = tonumber(redis.call('HGET', KEYS[1], 'top') or 0)
if seq > top or top == 0 then
  local now = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'top', math.max(seq, top),
    'ms', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
  top = math.max(seq, top)
end
if ARGV[2] == '1' then redis.call('ZADD', KEYS[2], ARGV[1], ARGV[1]) end
return top
