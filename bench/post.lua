-- wrk script: POST one JSON body on every request and count non-2xx responses.
-- Arguments after "--": the path of the body file, the bearer token, and the warm-up in
-- seconds. Responses that arrive during the warm-up are left out of "counted", so that
-- the rate is not lowered by the first seconds, in which a slow server has sent no
-- response yet. wrk's latency percentiles still cover the whole run.
-- done() prints one line "BENCH_RESULT {json}" that bench/load.py parses.
-- Latencies are wrk's microsecond values, converted to milliseconds here.

local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock_id, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local timespec = ffi.new("bench_timespec")

local function now()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
  return tonumber(timespec.tv_sec) + tonumber(timespec.tv_nsec) / 1e9
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local file = assert(io.open(args[1], "rb"))
  local body = file:read("*a")
  file:close()
  wrk.method = "POST"
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. args[2]
  prepared_request = wrk.format()
  counted_from = now() + tonumber(args[3] or "0")
  counted = 0
  responses = 0
  non2xx = 0
  first_failure = ""
end

function request()
  return prepared_request
end

function response(status, headers, body)
  responses = responses + 1
  if now() >= counted_from then
    counted = counted + 1
  end
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    if first_failure == "" then
      -- Quotes, backslashes and control characters would break the JSON line.
      first_failure = status .. " " .. string.gsub(string.sub(body or "", 1, 300), '[%c"\\]', " ")
    end
  end
end

function done(summary, latency, requests)
  local responses_total, counted_total, non2xx_total, failure = 0, 0, 0, ""
  for _, thread in ipairs(threads) do
    responses_total = responses_total + thread:get("responses")
    counted_total = counted_total + thread:get("counted")
    non2xx_total = non2xx_total + thread:get("non2xx")
    if failure == "" then
      failure = thread:get("first_failure") or ""
    end
  end
  local errors = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "responses": %d, "counted": %d, "duration_s": %.6f, '
      .. '"non2xx": %d, '
      .. '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d, '
      .. '"p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, "mean_ms": %.3f, '
      .. '"first_failure": "%s"}\n',
    summary.requests, responses_total, counted_total, summary.duration / 1e6, non2xx_total,
    errors.connect, errors.read, errors.write, errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000, latency.mean / 1000,
    failure))
end
