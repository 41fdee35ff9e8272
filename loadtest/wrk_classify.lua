-- wrk script of the load-test harness (loadtest/probe.py, wrk()): POST /classify bodies read from a file (one JSON
-- body per line), each connection cycling through them from its own offset; prints a JSON summary at the end.
--   wrk -t2 -c64 -d30s -s loadtest/wrk_classify.lua http://127.0.0.1:8000 -- bodies.jsonl
local requests = {}
local next_index = 1
local counter = 0

function init(args)
  for line in io.lines(args[1]) do
    requests[#requests + 1] = wrk.format("POST", "/classify", {["Content-Type"] = "application/json"}, line)
  end
  counter = counter + 1
  next_index = (counter * 7919) % #requests + 1
end

function request()
  local r = requests[next_index]
  next_index = next_index % #requests + 1
  return r
end

-- latency:percentile(p) is the latency at 0-based rank floor(p/100 * n) of the n answers (wrk's stats_percentile
-- counts up to rank round(p/100 * n + 0.5)), at wrk's 1 us resolution: the definition of loadtest/probe.py's
-- percentile(), which every script uses.
function done(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
