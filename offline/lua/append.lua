-- Append entries to one user's offline store, each with the next version.
-- KEYS[1] the user's sync hash, KEYS[2] the user's log, KEYS[3] its presence (offline/keys.py)
-- ARGV[1] run_id of the Redis the caller talks to, ARGV[2] OFFLINE_MAX_ENTRIES,
-- ARGV[3] key lifetime (ms), ARGV[4] mode, then:
--   mode "m" (messages):   triples  cid, top seq, read seq
--       every seq in (y:<cid>, top] gets an entry; read seq stands in for an unknown y:<cid>
--       (a join not recorded yet: the joiner's read pointer starts at the join's last_seq)
--   mode "o" (operations): 5-tuples type, cid, watermark, seq, arg
--       type r (read; watermark = seq, field q:), j/l/u (join/leave/mute; watermark = rev,
--       field v:); a join's seq (the conversation's last_seq then, -1 for a membership re-sent
--       but not joining now) starts y:<cid>; a leave forgets y: and q: (a rejoin starts anew)
-- Idempotent: what is at or below a watermark was recorded already and is skipped.
-- Returns {1, first, last, devices online} (first > last: nothing new), {-1} not loaded here,
-- {-2, need} the stored bound is below the versions needed (raise it to need, retry).
local state, log = KEYS[1], KEYS[2]
local head = redis.call('HMGET', state, 'rid', 'cur', 'bound', 'floor')
if head[1] ~= ARGV[1] then return {-1} end
local cur, bound, floor = tonumber(head[2]), tonumber(head[3]), tonumber(head[4])
-- Entries above the floor exist but the log is gone (evicted apart from the hash): reload.
if cur > floor and redis.call('EXISTS', log) == 0 then return {-1} end
local maxn = tonumber(ARGV[2])
local mode = ARGV[4]

local plan, n, hole = {}, 0, false
local planned = {}
local function field_value(f, default)
  local v = planned[f]
  if v == nil then v = tonumber(redis.call('HGET', state, f)) end
  if v == nil then return default end
  return v
end
if mode == 'm' then
  for i = 5, #ARGV, 3 do
    local cid, top = ARGV[i], tonumber(ARGV[i + 1])
    local y = field_value('y:' .. cid, tonumber(ARGV[i + 2]))
    if top > y then
      local from = y + 1
      if top - y > maxn then
        -- More than the store keeps: record the newest; devices behind get the gap snapshot.
        from, hole = top - maxn + 1, true
      end
      plan[#plan + 1] = {cid, from, top}
      planned['y:' .. cid] = top
      n = n + top - from + 1
    end
  end
else
  for i = 5, #ARGV, 5 do
    local typ, cid, wm = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
    local f = (typ == 'r') and ('q:' .. cid) or ('v:' .. cid)
    if typ == 'd' or typ == 'e' then f = false end
    if not f or wm > field_value(f, -1) then
      plan[#plan + 1] = {typ, cid, wm, tonumber(ARGV[i + 3]), ARGV[i + 4], f}
      if f then planned[f] = wm end
      n = n + 1
    end
  end
end
if n == 0 then return {1, cur + 1, cur} end
if hole then n = n + 1 end
if cur + n > bound then return {-2, cur + n} end

local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local stamp = '|' .. string.format('%d', now) .. '|'
local v = cur
if hole then
  -- One version stays unused: a device at or behind it missed what was skipped.
  v = v + 1
  floor = v
end
local first = v + 1
local fields = {}
if mode == 'm' then
  local adds = {}
  for _, p in ipairs(plan) do
    local cid = p[1]
    for s = p[2], p[3] do
      v = v + 1
      adds[#adds + 1] = v
      adds[#adds + 1] = string.format('%d|', v) .. stamp:sub(2) .. 'm|' .. cid .. '|' .. string.format('%d', s)
      if #adds >= 1000 then
        redis.call('ZADD', log, unpack(adds))
        adds = {}
      end
    end
    fields[#fields + 1] = 'y:' .. cid
    fields[#fields + 1] = p[3]
  end
  if #adds > 0 then redis.call('ZADD', log, unpack(adds)) end
else
  for _, p in ipairs(plan) do
    local typ, cid = p[1], p[2]
    v = v + 1
    redis.call('ZADD', log, v, string.format('%d', v) .. stamp .. typ .. '|' .. cid .. '|' .. p[5])
    if p[6] then redis.call('HSET', state, p[6], p[3]) end
    if typ == 'j' and p[4] >= 0 then
      local y = tonumber(redis.call('HGET', state, 'y:' .. cid)) or -1
      if p[4] > y then redis.call('HSET', state, 'y:' .. cid, p[4]) end
    elseif typ == 'l' then
      redis.call('HDEL', state, 'y:' .. cid, 'q:' .. cid)
    end
  end
end
-- Never more than OFFLINE_MAX_ENTRIES: the oldest go, and the floor moves past them.
local size = redis.call('ZCARD', log)
if size > maxn then
  local cut = redis.call('ZRANGE', log, size - maxn - 1, size - maxn - 1, 'WITHSCORES')
  redis.call('ZREMRANGEBYRANK', log, 0, size - maxn - 1)
  if tonumber(cut[2]) > floor then floor = tonumber(cut[2]) end
end
redis.call('HSET', state, 'cur', v, 'floor', floor)
for i = 1, #fields, 1000 do
  redis.call('HSET', state, unpack(fields, i, math.min(i + 999, #fields)))
end
redis.call('PEXPIRE', state, ARGV[3])
redis.call('PEXPIRE', log, ARGV[3])
return {1, first, v, redis.call('ZCOUNT', KEYS[3], now, '+inf')}
