--[[ token_fill: cache a token's device after it was read from PostgreSQL, unless the token
was revoked meanwhile (a logout that committed after the read set its tombstone).
KEYS[1]  the token's cache entry, imc:{t:<sha256>}:dev
KEYS[2]  the token's tombstone, imc:{t:<sha256>}:gone
ARGV[1]  the entry (JSON of the device and user fields)
ARGV[2]  its lifetime, in seconds
Returns  1 when cached, 0 when the token was revoked. ]]
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
