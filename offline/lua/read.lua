-- One page of a user's offline store, with what a device needs to use it.
-- KEYS[1] sync hash, KEYS[2] log, KEYS[3] the device's package, KEYS[4] its snapshot
-- ARGV[1] run_id, ARGV[2] since, ARGV[3] limit
-- Returns {-1} not loaded here; {-3, cur} since is ahead of cur;
-- {0, cur, floor, snapshot or false} since is behind the floor (gap);
-- {1, cur, floor, entries (limit + 1 at most), package entries, the entry at since or false}
-- (its time tells ``/sync``'s ``channels`` what the device knew: offline/selectors.py).
local state = KEYS[1]
if redis.call('HGET', state, 'rid') ~= ARGV[1] then return {-1} end
local cur = tonumber(redis.call('HGET', state, 'cur'))
local floor = tonumber(redis.call('HGET', state, 'floor'))
local since, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
if since > cur then return {-3, cur} end
-- Entries above the floor exist but the log is gone (evicted apart from the hash): reload.
if cur > floor and redis.call('EXISTS', KEYS[2]) == 0 then return {-1} end
if since < floor then return {0, cur, floor, redis.call('GET', KEYS[4])} end
local after = '(' .. ARGV[2]
local entries = redis.call('ZRANGEBYSCORE', KEYS[2], after, '+inf', 'LIMIT', 0, limit + 1)
local package = redis.call('ZRANGEBYSCORE', KEYS[3], after, '+inf', 'LIMIT', 0, limit)
local at = redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[2], ARGV[2], 'LIMIT', 0, 1)[1] or false
return {1, cur, floor, entries, package, at}
