-- wrk script: GET a rotating set of paths (config keys) with a bearer token (bench/config_watch.py).
-- Arguments (after "--"): <token> <path prefix> <count: 0 = the prefix alone, else prefix .. "%03d" of 0..count-1>
-- done() prints one JSON line (prefixed "WRKJSON "), the same fields as post_events.lua.

local prefix, count
local counter = 0

function init(args)
  wrk.headers["Authorization"] = "Bearer " .. args[1]
  prefix = args[2]
  count = tonumber(args[3]) or 0
end

function request()
  local path = prefix
  if count > 0 then
    path = prefix .. string.format("%03d", counter % count)
    counter = counter + 1
  end
  return wrk.format("GET", path)
end

function done(summary, latency, requests)
  local p = function(q) return latency:percentile(q) end
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"non2xx":%d,"connect_errors":%d,'
      .. '"read_errors":%d,"write_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
      .. '"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout, p(50), p(90), p(99),
    latency.max, latency.mean))
end
