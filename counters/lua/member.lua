--[[ member: apply a membership change (join, leave, mute, unmute) in commit order, and the
form of the user's counters for the conversation (channel or aggregate, see keys.py).
KEYS[1]  the user's counter hash, imc:{u:<id>}:ctr
ARGV[1]  conversation id
ARGV[2]  rev of the membership row after the change (grows with every change)
ARGV[3]  "1" active, "0" left
ARGV[4]  "1" muted, "0" not
ARGV[5]  the membership's last_read_seq
ARGV[6]  the conversation's last seq at the change
ARGV[7]  the conversation's mode generation at the change (0 when absent)
ARGV[8]  the form of that generation: "c" channel, "a" aggregate (default)
ARGV[9]  seqs above the read pointer that mention everyone (comma separated; a conversion to
         the aggregate form folds the channel's record into n:<cid>)
ARGV[10] recalled seqs above the read pointer (comma separated; a conversion to the aggregate
         form folds the channel's record of recalls into x:<cid>)
The membership part applies when the rev is newer than the one applied; the form part when the
generation is newer, or the same with a newer rev. Each is ignored otherwise, so calls reaching Redis in any order end as
committed. A join keeps only the mentions above its read pointer; a leave deletes them.
Returns  the change of the stored badge (channel-form conversations are not in it). ]]
local h = KEYS[1]
local c = ARGV[1]
local rev = tonumber(ARGV[2])
local gen = tonumber(ARGV[7] or 0)
local rev_new = rev > tonumber(redis.call('HGET', h, 'v:' .. c) or 0)
local stored_gen = tonumber(redis.call('HGET', h, 'g:' .. c) or 0)
local gen_new = gen > stored_gen
if not rev_new and not gen_new then return 0 end
local old = 0
local unread = redis.call('HGET', h, 'u:' .. c)
if unread and redis.call('HGET', h, 'm:' .. c) ~= '1' then old = tonumber(unread) end
local form = 'a'
if redis.call('HEXISTS', h, 'c:' .. c) == 1 then form = 'c' end
if gen_new then
  redis.call('HSET', h, 'g:' .. c, gen)
  form = ARGV[8] or 'a'
elseif rev_new and gen == stored_gen then
  -- a membership change of the current generation carries its form (a rejoin after a leave,
  -- which deleted c:, is in the form of the generation it joined in)
  form = ARGV[8] or 'a'
end
local active = unread ~= false or redis.call('HEXISTS', h, 'c:' .. c) == 1
if rev_new then
  redis.call('HSET', h, 'v:' .. c, rev)
  active = ARGV[3] == '1'
  if active then redis.call('HSET', h, 'm:' .. c, ARGV[4]) end
end
local new = 0
if active then
  local n, r = set_active(h, c, ARGV[5], ARGV[6], form, ARGV[10])
  if form ~= 'c' and redis.call('HGET', h, 'm:' .. c) ~= '1' then new = n end
  store_mentions(h, c, ARGV[9], r)
else
  redis.call('HDEL', h, 'u:' .. c, 'r:' .. c, 't:' .. c, 'm:' .. c, 'n:' .. c, 'c:' .. c,
    'x:' .. c)
end
local d = new - old
if d ~= 0 then redis.call('HINCRBY', h, 'badge', d) end
return d
