-- wrk script for bench/intake.sh: POSTs signed, distinct push deliveries to /webhook.
--
-- Environment (set by intake.sh):
--   BENCH_DATA      file from gen_payloads.py: "<delivery>\t<signature>\t<body>" per line
--   BENCH_THREADS   the -t given to wrk
--   BENCH_ACK_FILE  where done() writes the delivery id of every 202 seen, one a line
--
-- Thread k (1-based) of T sends lines k, k+T, k+2T, ... in order, so every request is
-- distinct across all threads. A thread that runs out wraps around and then sends
-- duplicates (the daemon answers 200 {"duplicate":true}); done() reports "wrapped".

local threads = {}
local started = 0

function setup(thread)
   started = started + 1
   thread:set("tid", started)
   table.insert(threads, thread)
end

function init(args)
   local path = assert(os.getenv("BENCH_DATA"), "BENCH_DATA not set")
   local nthreads = assert(tonumber(os.getenv("BENCH_THREADS")), "BENCH_THREADS not set")
   local me = tid - 1
   reqs = {}
   local n, i = 0, 0
   for line in io.lines(path) do
      if i % nthreads == me then
         local id, sig, body = line:match("^([^\t]+)\t([^\t]+)\t(.*)$")
         n = n + 1
         reqs[n] = wrk.format("POST", "/webhook", {
            ["Content-Type"] = "application/json",
            ["X-GitHub-Event"] = "push",
            ["X-GitHub-Delivery"] = id,
            ["X-Hub-Signature-256"] = sig,
         }, body)
      end
      i = i + 1
   end
   assert(n > 0, "no payloads for thread " .. tid)
   nreqs = n
   idx = 0
   wrapped = 0
   acked = {}   -- delivery ids answered 202
   acked_n = 0
   noid = 0     -- 202s whose body named no delivery id
   statuses = {} -- status -> count, every status but 202
end

function request()
   idx = idx + 1
   if idx > nreqs then
      idx = 1
      wrapped = wrapped + 1
   end
   return reqs[idx]
end

function response(status, headers, body)
   if status == 202 then
      acked_n = acked_n + 1
      local id = body and body:match('"delivery":"([^"]+)"')
      if id then
         acked[#acked + 1] = id
      else
         noid = noid + 1
      end
   else
      statuses[status] = (statuses[status] or 0) + 1
   end
end

function done(summary, latency, requests)
   local ack_path = os.getenv("BENCH_ACK_FILE")
   local out = ack_path and assert(io.open(ack_path, "w"))
   local total_acked, total_noid, total_wrapped, min_share = 0, 0, 0, nil
   local all_statuses = {}
   for _, t in ipairs(threads) do
      total_acked = total_acked + (t:get("acked_n") or 0)
      total_noid = total_noid + (t:get("noid") or 0)
      total_wrapped = total_wrapped + (t:get("wrapped") or 0)
      local share = t:get("nreqs") or 0
      if not min_share or share < min_share then min_share = share end
      if out then
         for _, id in ipairs(t:get("acked") or {}) do
            out:write(id, "\n")
         end
      end
      for status, count in pairs(t:get("statuses") or {}) do
         all_statuses[status] = (all_statuses[status] or 0) + count
      end
   end
   if out then out:close() end

   local non2xx, dup200 = 0, 0
   local parts = {}
   for status, count in pairs(all_statuses) do
      if status == 200 then dup200 = dup200 + count end
      if status < 200 or status > 299 then non2xx = non2xx + count end
      parts[#parts + 1] = string.format("%d:%d", status, count)
   end
   table.sort(parts)
   local e = summary.errors
   io.write(string.format(
      "BENCH requests=%d duration_us=%d rps=%.1f p50_us=%d p90_us=%d p99_us=%d max_us=%d " ..
      "acked=%d dup200=%d non2xx=%d noid=%d wrapped=%d share=%d " ..
      "err_connect=%d err_read=%d err_write=%d err_timeout=%d statuses=%s\n",
      summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      total_acked, dup200, non2xx, total_noid, total_wrapped, min_share or 0,
      e.connect, e.read, e.write, e.timeout,
      (#parts > 0) and table.concat(parts, ",") or "-"))
end
