-- (Re)load one user's sync hash after Redis lost it or restarted (maybe from an older
-- snapshot). The caller raised the user's bound in PostgreSQL by a step first and passes
-- cur = old bound + 1: above every version ever handed out. That version stays unused and
-- becomes the floor, so every device that synced before gets the gap snapshot.
-- KEYS[1] sync hash, KEYS[2] log
-- ARGV[1] run_id, ARGV[2] cur, ARGV[3] bound, ARGV[4] key lifetime (ms),
-- then 4-tuples per active membership: cid, conversation last_seq, read seq, rev
-- Returns 1 when loaded, 0 when it was loaded for this run_id already (and is whole).
local state, log = KEYS[1], KEYS[2]
local head = redis.call('HMGET', state, 'rid', 'cur', 'floor')
if head[1] == ARGV[1] then
  -- Loaded for this run_id already, unless its log went missing (evicted apart from it).
  local lost = tonumber(head[2]) > tonumber(head[3]) and redis.call('EXISTS', log) == 0
  if not lost then return 0 end
end
redis.call('DEL', state, log)
redis.call('HSET', state, 'cur', ARGV[2], 'bound', ARGV[3], 'floor', ARGV[2], 'rid', ARGV[1])
for i = 5, #ARGV, 4 do
  local cid = ARGV[i]
  redis.call('HSET', state, 'y:' .. cid, ARGV[i + 1], 'q:' .. cid, ARGV[i + 2],
    'v:' .. cid, ARGV[i + 3])
end
redis.call('PEXPIRE', state, ARGV[4])
return 1
