--[[ load: rebuild one user's counters from PostgreSQL rows (first read after a wipe,
reconcile, admin action).
KEYS[1]  the user's counter hash, imc:{u:<id>}:ctr
ARGV     groups of 10, one per membership row of the user (active or left):
         conversation id, rev, active "1"/"0", muted "1"/"0", last_read_seq, conversation last_seq,
         the seqs of the messages above last_read_seq that mention the user (comma separated),
         the conversation's mode generation, its form ("c" channel, "a" aggregate), the
         recalled seqs above last_read_seq (comma separated; joined with those Redis holds:
         a recall is written after its commit, so a held one is never wrong)
Returns  the stored badge after the load (channel-form conversations are not in it).

A row's membership applies unless Redis already holds a newer rev for that conversation (a
change committed after the rows were read), and its form unless Redis holds a newer mode
generation; read and top pointers only move up, so events applied between the read of the rows
and this script are kept. Every unread is recomputed as top - read - recalled and the badge as their sum
over unmuted conversations. The mentions are the row's and those Redis holds above the row's
top (committed after the rows were read; the caller reads the mentions after the rows, so the
row's cover every seq up to its top and a wrong one held below it goes), all above the read
pointer. Then the hash is ready. ]]
local h = KEYS[1]
for i = 1, #ARGV, 10 do
  local c = ARGV[i]
  local rev_ok = tonumber(ARGV[i + 1]) >= tonumber(redis.call('HGET', h, 'v:' .. c) or 0)
  local gen = tonumber(ARGV[i + 7])
  local form = 'a'
  if redis.call('HEXISTS', h, 'c:' .. c) == 1 then form = 'c' end
  if gen >= tonumber(redis.call('HGET', h, 'g:' .. c) or 0) then
    redis.call('HSET', h, 'g:' .. c, gen)
    form = ARGV[i + 8]
  end
  local active = redis.call('HEXISTS', h, 'r:' .. c) == 1
  if rev_ok then
    redis.call('HSET', h, 'v:' .. c, ARGV[i + 1])
    active = ARGV[i + 2] == '1'
    if active then redis.call('HSET', h, 'm:' .. c, ARGV[i + 3]) end
  end
  if active then
    local _, r = set_active(h, c, ARGV[i + 4], ARGV[i + 5], form, ARGV[i + 9])
    if rev_ok then store_mentions(h, c, ARGV[i + 6], r, tonumber(ARGV[i + 5])) end
  else
    redis.call('HDEL', h, 'u:' .. c, 'r:' .. c, 't:' .. c, 'm:' .. c, 'n:' .. c, 'c:' .. c,
      'x:' .. c)
  end
end
local all = redis.call('HGETALL', h)
local badge = 0
for i = 1, #all, 2 do
  local f = all[i]
  if string.sub(f, 1, 2) == 'u:' then
    local c = string.sub(f, 3)
    local t = tonumber(redis.call('HGET', h, 't:' .. c) or 0)
    local r = tonumber(redis.call('HGET', h, 'r:' .. c) or 0)
    local n = math.max(t - r - seqs_count(redis.call('HGET', h, 'x:' .. c)), 0)
    if n ~= tonumber(all[i + 1]) then redis.call('HSET', h, f, n) end
    if redis.call('HGET', h, 'm:' .. c) ~= '1' then badge = badge + n end
  end
end
redis.call('HSET', h, 'badge', badge, 'ready', 1)
return badge
