-- wrk script for bench/intake.sh: POSTs signed, distinct push deliveries to /webhook.
--
-- Environment (set by intake.sh):
--   BENCH_DATA      file from gen_payloads.py: "<delivery>\t<signature>\t<body>" per line
--   BENCH_THREADS   the -t given to wrk
--   BENCH_ACK_FILE  where done() writes the delivery id of every 202 seen, one a line
--   BENCH_SLOTS     (optional) for a receiver whose answer does not name the delivery:
--                   the number of slots per thread, see below
--   BENCH_SLOT_PATH (with BENCH_SLOTS) the path before the slot number, e.g. /hooks/push-
--
-- Thread k (1-based) of T sends lines k, k+T, k+2T, ... in order, so every request is
-- distinct across all threads. A thread that runs out wraps around and then sends
-- duplicates (the daemon answers 200 {"duplicate":true}); done() reports "wrapped".
--
-- Slots: wrk does not tell response() which request it answers, and a receiver with a
-- fixed answer (webhook's response-message) does not say either. With BENCH_SLOTS, each
-- request in flight on a thread holds a free slot j and goes to BENCH_SLOT_PATH .. j,
-- whose hook answers 200 "slot=j"; the answer's slot names the delivery it acknowledged.
-- A thread never has more requests in flight than connections, so with more slots than
-- that a free one always exists, unless a connection broke with a request in flight
-- (its slot is never answered); then the oldest slot is taken over and done() reports
-- "noslot".

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
   nslots = tonumber(os.getenv("BENCH_SLOTS"))
   slot_path = os.getenv("BENCH_SLOT_PATH")
   assert(not nslots or slot_path, "BENCH_SLOTS needs BENCH_SLOT_PATH")
   reqs = {}
   ids, sigs, bodies = {}, {}, {}
   local n, i = 0, 0
   for line in io.lines(path) do
      if i % nthreads == me then
         local id, sig, body = line:match("^([^\t]+)\t([^\t]+)\t(.*)$")
         n = n + 1
         if nslots then
            ids[n], sigs[n], bodies[n] = id, sig, body
         else
            reqs[n] = wrk.format("POST", "/webhook", headers_of(id, sig), body)
         end
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
   if nslots then
      free = {}      -- slots not in flight (a stack)
      inflight = {}  -- slot -> index of the request holding it
      since = {}     -- slot -> sequence number of that request, to find the oldest
      for j = nslots - 1, 0, -1 do free[#free + 1] = j end
      seq = 0
      noslot = 0
   end
end

function headers_of(id, sig)
   return {
      ["Content-Type"] = "application/json",
      ["X-GitHub-Event"] = "push",
      ["X-GitHub-Delivery"] = id,
      ["X-Hub-Signature-256"] = sig,
   }
end

-- The slot for the next request: a free one, else the oldest in flight (a broken
-- connection's, which will never be answered).
local function take_slot()
   local j = table.remove(free)
   if j then return j end
   noslot = noslot + 1
   local oldest
   for k, s in pairs(since) do
      if not oldest or s < since[oldest] then oldest = k end
   end
   return oldest
end

function request()
   idx = idx + 1
   if idx > nreqs then
      idx = 1
      wrapped = wrapped + 1
   end
   if not nslots then
      return reqs[idx]
   end
   local j = take_slot()
   seq = seq + 1
   inflight[j], since[j] = idx, seq
   return wrk.format("POST", slot_path .. j, headers_of(ids[idx], sigs[idx]), bodies[idx])
end

function response(status, headers, body)
   if nslots then
      local j = tonumber(body and body:match("^slot=(%d+)"))
      local idx = j and inflight[j]
      if idx then
         inflight[j], since[j] = nil, nil
         free[#free + 1] = j
      end
      if status == 200 and idx then
         acked_n = acked_n + 1
         acked[#acked + 1] = ids[idx]
      elseif status == 200 then
         noid = noid + 1
      else
         statuses[status] = (statuses[status] or 0) + 1
      end
      return
   end
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
   local total_acked, total_noid, total_wrapped, total_noslot, min_share = 0, 0, 0, 0, nil
   local all_statuses = {}
   for _, t in ipairs(threads) do
      total_acked = total_acked + (t:get("acked_n") or 0)
      total_noid = total_noid + (t:get("noid") or 0)
      total_wrapped = total_wrapped + (t:get("wrapped") or 0)
      total_noslot = total_noslot + (t:get("noslot") or 0)
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
      "acked=%d dup200=%d non2xx=%d noid=%d wrapped=%d noslot=%d share=%d " ..
      "err_connect=%d err_read=%d err_write=%d err_timeout=%d statuses=%s\n",
      summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      total_acked, dup200, non2xx, total_noid, total_wrapped, total_noslot, min_share or 0,
      e.connect, e.read, e.write, e.timeout,
      (#parts > 0) and table.concat(parts, ",") or "-"))
end
