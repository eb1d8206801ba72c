-- bench/send.py's wrk script: each thread (one a client) takes its client's token from
-- BENCH_CLIENTS ("token,conversation,since;..."), calls BENCH_CALL; done() prints wrk's own
-- counts and HdrHistogram percentiles, non-2xx answers counted as errors.
local clients, call, tag, body = {}, os.getenv("BENCH_CALL"), os.getenv("BENCH_TAG"), os.getenv("BENCH_BODY")
for token, cid, since in os.getenv("BENCH_CLIENTS"):gmatch("([^,;]+),(%d+),(%d+)") do
  table.insert(clients, { token, cid, since })
end
local threads, count = {}, 0
function setup(thread)
  count = count + 1; thread:set("index", count); table.insert(threads, thread)
end
function init(args)
  c = clients[(index - 1) % #clients + 1]; n, bad = 0, 0
  wrk.headers["Authorization"] = "Bearer " .. c[1]; wrk.headers["Content-Type"] = "application/json"
end
function request()
  n = n + 1
  local conv = "/api/v1/conversations/" .. c[2]
  if call == "send" then return wrk.format("POST", conv .. "/messages", nil,
      '{"body":"' .. body .. '","client_msg_id":"' .. tag .. "-" .. index .. "-" .. n .. '"}')
  elseif call == "read" then return wrk.format("POST", conv .. "/read", nil, '{"seq":1}')
  elseif call == "sync" then return wrk.format("GET", "/api/v1/sync?limit=100&since=" .. c[3]) end
  return wrk.format("GET", "/api/v1/" .. call)
end
function response(status) if status > 299 then bad = bad + 1 end end
function done(s, latency)
  local b = 0; for _, t in ipairs(threads) do b = b + t:get("bad") end
  local e = s.errors
  io.write(string.format("BENCH %d %d %d %d %d\n", s.duration, s.requests - b,
    b + e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))
end
