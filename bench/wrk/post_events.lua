-- wrk script: POST CloudEvents to the tagbus event bus, each with a unique id.
-- Arguments (after "--"): <token> <run prefix> <batch size: 0 = single POST /v1/events>
-- Paced mode: with TAGBUS_WRK_PAUSE_MS set, each connection waits that long between requests
-- (read at load time: wrk decides whether a script has delay() before init() runs).
-- done() prints one JSON line (prefixed "WRKJSON ") that bench/ingest.py parses.

local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("tid", thread_count)
  table.insert(threads, thread)
end

local token, prefix, batch
local pause_ms = tonumber(os.getenv("TAGBUS_WRK_PAUSE_MS") or "")
local counter = 0
local pad = string.rep("x", 96)

function init(args)
  token = args[1]
  prefix = args[2] .. "-" .. tostring(tid)
  batch = tonumber(args[3]) or 0
  wrk.headers["Authorization"] = "Bearer " .. token
  if batch > 0 then
    wrk.headers["Content-Type"] = "application/cloudevents-batch+json"
  else
    wrk.headers["Content-Type"] = "application/cloudevents+json"
  end
end

-- ~200 bytes of data, like a small domain event; its own stream (streamid defaults to subject).
local function event()
  counter = counter + 1
  local id = prefix .. "-" .. counter
  return '{"specversion":"1.0","id":"' .. id .. '","source":"/bench/wrk","type":"bench.recorded",'
    .. '"subject":"bench/' .. id .. '","data":{"order":"' .. id .. '","amount":' .. counter
    .. ',"currency":"EUR","items":[{"sku":"A-1","qty":2},{"sku":"B-7","qty":1}],"note":"' .. pad .. '"}}'
end

function request()
  if batch > 0 then
    local parts = {}
    for i = 1, batch do
      parts[i] = event()
    end
    return wrk.format("POST", "/v1/events:batch", nil, "[" .. table.concat(parts, ",") .. "]")
  end
  return wrk.format("POST", "/v1/events", nil, event())
end

if pause_ms then
  function delay()
    return pause_ms
  end
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
