-- wrk script for `moe-serve bench`: POSTs request bodies read from the file in env WRK_BODIES (one JSON body per
-- line), each connection starting at its own offset, and prints one JSON line of results when done.
local bodies = {}
local counter = 0

function init(args)
  for line in io.lines(os.getenv("WRK_BODIES")) do
    if #line > 0 then bodies[#bodies + 1] = line end
  end
  wrk.method = "POST"
  wrk.path = os.getenv("WRK_PATH") or "/v1/classify"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  return wrk.format(nil, nil, nil, bodies[(counter % #bodies) + 1])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, "timeouts": %d, ' ..
    '"p50_us": %d, "p95_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
