-- wrk script for the gateway benchmark: POST a chat completion request and report JSON.
--
-- Configured through the environment so one script serves every mode:
--   BENCH_BODY  request body (JSON)                       [required]
--   BENCH_KEY   bearer token sent as Authorization        [default: sk-bench]
--
-- done() prints one line starting with "BENCH_JSON " that bench/harness.py parses; this is
-- more robust than scraping wrk's human-readable --latency table (units vary: us/ms/s).
-- Latencies are in microseconds.

local body = os.getenv("BENCH_BODY")
if body == nil or body == "" then
  io.stderr:write("chat.lua: BENCH_BODY is not set\n")
  os.exit(2)
end
local key = os.getenv("BENCH_KEY") or "sk-bench"

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
wrk.headers["Authorization"] = "Bearer " .. key

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_status":%d,"errors_timeout":%d,' ..
    '"lat_mean_us":%.1f,"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
