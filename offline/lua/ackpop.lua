-- Take the pending acks for writing to PostgreSQL. A batch a dead flusher left in flight is
-- returned again (the write is idempotent: acks only move up).
-- KEYS[1] pending, KEYS[2] inflight. Returns a flat list device pk, version, ...
if redis.call('EXISTS', KEYS[2]) == 0 then
  if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
  redis.call('RENAME', KEYS[1], KEYS[2])
end
return redis.call('HGETALL', KEYS[2])
