--[[ recall_channel: a message of a conversation was recalled; its record for the channel
form. O(1) whatever the group's size: no write per member.
KEYS[1]  the conversation's channel hash, imc:{c:<cid>}:ch
KEYS[2]  its record of mention_all seqs, imc:{c:<cid>}:all (ZSET)
KEYS[3]  its record of recalled seqs, imc:{c:<cid>}:rc (ZSET, score = member = seq)
ARGV[1]  the recalled seq
ARGV[2]  "1" when the conversation sends in channel form (the top rises to the seq if lower,
         and ``ms`` moves, so ``/sync``'s ``channels`` shows a change); "0" otherwise (only
         the record is kept, for a later conversion to the channel form). A top Redis lost
         stays absent: the next read sets it, and the record, from PostgreSQL
Each reader's unread is top - r - (recalled seqs above r); the seq leaves the mention_all
record. Idempotent.
Returns  1 when the seq was new to the record, 0 otherwise. ]]
local added = redis.call('ZADD', KEYS[3], ARGV[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[2] == '1' then
  local seq = tonumber(ARGV[1])
  local top = tonumber(redis.call('HGET', KEYS[1], 'top') or 0)
  if top == 0 then return added end -- lost (a wipe): the next read repairs it from PostgreSQL
  local now = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'top', math.max(seq, top),
    'ms', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
end
return added
