-- wrk script: POST CloudEvents to the tagbus event bus, each with a unique id.
-- Arguments (after "--"): <token> <run prefix> <batch size: 0 = single POST /v1/events>
-- Paced mode: with TAGBUS_WRK_PAUSE_MS set, each connection waits that long between requests
-- (read at load time: wrk decides whether a script has delay() before init() runs).
-- Tally mode: with TAGBUS_WRK_TALLY set, every answer is counted by status class, by whether a
-- 429/503 carried Retry-After, and by wall-clock second (tests/reliability/overload.py).
-- done() prints one JSON line (prefixed "WRKJSON ") that bench/ingest.py parses, and in tally
-- mode a second one (prefixed "WRKTALLY ").

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

if os.getenv("TAGBUS_WRK_TALLY") then
  -- Globals of each thread's Lua state, read by done() through thread:get. Only numbers and
  -- strings: wrk's copy of a table between Lua states lost entries (and crashed) in trials.
  ok, too_many, unavailable, other, retry_after = 0, 0, 0, 0, 0
  seconds = ""  -- "<unix second> <2xx> <429+503> <other>;" per second, flushed when it changes
  second, second_ok, second_shed, second_other = 0, 0, 0, 0  -- the second being counted

  local function flush()
    if second > 0 then
      seconds = seconds .. string.format("%d %d %d %d;", second, second_ok, second_shed, second_other)
    end
  end

  function response(status, headers, body)
    local now = os.time()
    if now ~= second then
      flush()
      second, second_ok, second_shed, second_other = now, 0, 0, 0
    end
    if status >= 200 and status < 300 then
      ok, second_ok = ok + 1, second_ok + 1
    elseif status == 429 or status == 503 then
      if status == 429 then too_many = too_many + 1 else unavailable = unavailable + 1 end
      second_shed = second_shed + 1
      if headers["retry-after"] or headers["Retry-After"] then
        retry_after = retry_after + 1
      end
    else
      other, second_other = other + 1, second_other + 1
    end
  end
end

local function tally()
  local names = {"ok", "too_many", "unavailable", "other", "retry_after"}
  local total = {ok = 0, too_many = 0, unavailable = 0, other = 0, retry_after = 0}
  local seconds = {}
  for _, thread in ipairs(threads) do
    for _, name in ipairs(names) do
      total[name] = total[name] + (thread:get(name) or 0)
    end
    seconds[#seconds + 1] = thread:get("seconds") or ""
    local open = thread:get("second") or 0  -- the second still being counted when the run ended
    if open > 0 then
      local counts = {thread:get("second_ok"), thread:get("second_shed"), thread:get("second_other")}
      seconds[#seconds + 1] = string.format("%d %d %d %d;", open, counts[1], counts[2], counts[3])
    end
  end
  local parts = {}
  for _, name in ipairs(names) do
    parts[#parts + 1] = string.format('"%s":%d', name, total[name])
  end
  return "{" .. table.concat(parts, ",") .. ',"seconds":"' .. table.concat(seconds) .. '"}'
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
  if os.getenv("TAGBUS_WRK_TALLY") then
    io.write("WRKTALLY " .. tally() .. "\n")
  end
end
