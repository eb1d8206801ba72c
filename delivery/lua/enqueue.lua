--[[ enqueue: append one counter event to a shard and check the shard's length (the Flusher's
cheap length check, done where events are enqueued, in the same round trip).
KEYS[1]  the shard's stream, imc:{cq:<n>}:stream
KEYS[2]  the shard's flush-request flag, imc:{cq:<n>}:flush
ARGV[1]  conversation id
ARGV[2]  message seq (the idempotency key of the event)
ARGV[3]  threshold, in events
ARGV[4]  how long a flush request stays set, in milliseconds
ARGV[5..] more field, value pairs of the event (a message with mentions: u, m, a)
Returns  1 when the shard holds at least the threshold and no flush was requested yet (the
         caller sends the Flusher), else 0. ]]
local fields = {'c', ARGV[1], 's', ARGV[2]}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[1], '*', unpack(fields))
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[3]) then
  if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[4]) then return 1 end
end
return 0
