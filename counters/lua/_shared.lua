-- Shared by every counter script (counters/scripts.py prepends it): the unread mention seqs
-- of a conversation (field n:<cid>, ascending and comma separated), and the pointers and form
-- of an active membership.

-- The seqs of two comma-separated lists (nil or '' for none) that are above r, without
-- duplicates, ascending, comma separated ('' when none).
local function seqs_above(a, b, r)
  local seen, out = {}, {}
  for _, csv in ipairs({a or '', b or ''}) do
    for s in string.gmatch(csv, '%d+') do
      if not seen[s] and tonumber(s) > r then
        seen[s] = true
        out[#out + 1] = s
      end
    end
  end
  table.sort(out, function(x, y) return tonumber(x) < tonumber(y) end)
  return table.concat(out, ',')
end

-- How many seqs a comma-separated list holds.
local function seqs_count(csv)
  if not csv or csv == '' then return 0 end
  local _, commas = string.gsub(csv, ',', '')
  return commas + 1
end

-- Keep in x:<cid> (the recalled seqs above the read pointer) those it holds and those of `new`
-- above r; returns how many it holds. Every seq it holds is at or below t:<cid> (a recall
-- raises the top to its seq), so the unread is t - r - that count.
local function store_recalled(h, c, new, r)
  local cur = redis.call('HGET', h, 'x:' .. c)
  local kept = seqs_above(cur, new, r)
  if kept == '' then
    if cur then redis.call('HDEL', h, 'x:' .. c) end
  elseif kept ~= cur then
    redis.call('HSET', h, 'x:' .. c, kept)
  end
  return seqs_count(kept)
end

-- Keep in n:<cid> the seqs it holds and those of `new` above r (deletes the field when none is
-- left), but none that x:<cid> holds (a recalled message mentions nobody). With
-- `held_above`, a seq it holds stays only if above that too.
local function store_mentions(h, c, new, r, held_above)
  local cur = redis.call('HGET', h, 'n:' .. c)
  local held = cur
  if held_above and held_above > r then held = seqs_above(cur, nil, held_above) end
  local kept = seqs_above(held, new, r)
  local recalled = redis.call('HGET', h, 'x:' .. c)
  if recalled and kept ~= '' then
    local gone, out = {}, {}
    for s in string.gmatch(recalled, '%d+') do gone[s] = true end
    for s in string.gmatch(kept, '%d+') do
      if not gone[s] then out[#out + 1] = s end
    end
    kept = table.concat(out, ',')
  end
  if kept == '' then
    if cur then redis.call('HDEL', h, 'n:' .. c) end
  elseif kept ~= cur then
    redis.call('HSET', h, 'n:' .. c, kept)
  end
end


-- An active membership: move the read pointer r:<cid> and the top t:<cid> up to a row's
-- (read_seq, top), and give it the form: 'c' channel (c:<cid> set, no stored unread) or 'a'
-- aggregate (u:<cid> = t - r - recalled). `recalled`: recalled seqs (comma separated) that
-- join x:<cid>. Returns the unread and r.
local function set_active(h, c, read_seq, top, form, recalled)
  local r = math.max(tonumber(redis.call('HGET', h, 'r:' .. c) or 0), tonumber(read_seq))
  local t = math.max(tonumber(redis.call('HGET', h, 't:' .. c) or 0), tonumber(top), r)
  redis.call('HSET', h, 'r:' .. c, r, 't:' .. c, t)
  local n = t - r - store_recalled(h, c, recalled, r)
  if n < 0 then n = 0 end
  if form == 'c' then
    redis.call('HSET', h, 'c:' .. c, 1)
    redis.call('HDEL', h, 'u:' .. c)
  else
    redis.call('HSET', h, 'u:' .. c, n)
    redis.call('HDEL', h, 'c:' .. c)
  end
  return n, r
end
