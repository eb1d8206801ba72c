-- bench/send.py's wrk script: thread i (one a client) takes client i of BENCH_CLIENTS
-- ("token,conversation,since;..."), calls BENCH_CALL; done() prints wrk's own counts and
-- HdrHistogram percentiles, non-2xx answers counted as errors, and so is a sync answer that
-- is not a page (a gap's snapshot is another call's cost).
local env, clients = os.getenv, {}
local call, tag, body = env("BENCH_CALL"), env("BENCH_TAG"), env("BENCH_BODY")
for token, cid, since in env("BENCH_CLIENTS"):gmatch("([^,;]+),(%d+),(%d+)") do
  table.insert(clients, { token, cid, since })
end
local threads, count = {}, 0
function setup(thread) count = count + 1; thread:set("index", count); table.insert(threads, thread) end
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
function response(status, headers, body)
  if status > 299 or (call == "sync" and not body:find('"gap": ?false')) then bad = bad + 1 end
end
function done(s, latency)
  local b, e = 0, s.errors; for _, t in ipairs(threads) do b = b + t:get("bad") end
  io.write(string.format("BENCH %d %d %d %d %d\n", s.duration, s.requests - b,
    b + e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))
end
