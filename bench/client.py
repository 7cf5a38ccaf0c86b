#!/usr/bin/env python3
"""bench/run.sh's client of hookci on loopback: signed GitHub push deliveries, and the
read API's view of a run.

Usage:
  client.py post URL SECRET_FILE REPO CLONE_URL BEFORE AFTER
      One push of refs/heads/main from BEFORE to AFTER to URL (.../webhook). Prints
      "POST t0=T0_NS status=STATUS run=FIRST_RUN_ID": T0_NS is the wall clock (ns since
      the epoch, as `date +%s%N`) taken just before the connection is opened.
  client.py flood URL SECRET_FILE REPO CLONE_URL COUNT THREADS
      COUNT pushes of distinct made-up commits over THREADS keep-alive connections.
      Prints "FLOOD sent=N acked=N other=N" (acked: answered 202).
  client.py wait-run BASE_URL RUN_ID TIMEOUT_SECS
      Polls GET /api/runs/RUN_ID until the run has ended. Prints
      "RUN id=N status=S step_ms=D1,D2,... queue_ms=Q fetch_ms=F checkout_ms=C first_ms=T"
      (each step's duration_ms, then the run's push-to-first-step timings, "-" where
      the run has none); exit 1 on timeout.

The body is compact JSON and X-Hub-Signature-256 the HMAC-SHA256 of its exact bytes with
the secret, as GitHub sends them. Only 127.0.0.1 is accepted. Stdlib only.
"""

import hashlib
import hmac
import http.client
import json
import sys
import threading
import time
import urllib.parse
import uuid


def target(url: str):
    u = urllib.parse.urlsplit(url)
    if u.hostname != "127.0.0.1" or not u.port:
        raise SystemExit("client.py: only http://127.0.0.1:PORT/... is allowed, not %s" % url)
    return u.hostname, u.port, u.path or "/webhook"


def body_of(repo: str, clone_url: str, before: str, after: str, message: str) -> bytes:
    return json.dumps(
        {
            "ref": "refs/heads/main",
            "before": before,
            "after": after,
            "created": before == "0" * 40,
            "deleted": False,
            "forced": False,
            "head_commit": {"id": after, "message": message},
            "repository": {
                "full_name": repo,
                "clone_url": clone_url,
                "default_branch": "main",
            },
        },
        separators=(",", ":"),
    ).encode()


def headers_of(secret: bytes, body: bytes) -> dict:
    return {
        "Content-Type": "application/json",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest(),
    }


def read_secret(path: str) -> bytes:
    with open(path, "rb") as f:
        secret = f.read().strip()
    if not secret:
        raise SystemExit("client.py: empty secret in %s" % path)
    return secret


def post(url, secret_file, repo, clone_url, before, after) -> int:
    host, port, path = target(url)
    secret = read_secret(secret_file)
    body = body_of(repo, clone_url, before, after, "bench push %s" % after[:12])
    headers = headers_of(secret, body)
    t0 = time.time_ns()
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("POST", path, body=body, headers=headers)
    resp = conn.getresponse()
    answer = resp.read()
    conn.close()
    try:
        runs = json.loads(answer).get("runs") or []
    except ValueError:
        runs = []
    run = runs[0]["id"] if runs else "-"
    print("POST t0=%d status=%d run=%s" % (t0, resp.status, run))
    if resp.status not in (200, 202):
        print("client.py: %d %s" % (resp.status, answer.decode(errors="replace")), file=sys.stderr)
        return 1
    return 0


def flood(url, secret_file, repo, clone_url, count, threads) -> int:
    host, port, path = target(url)
    secret = read_secret(secret_file)
    count, threads = int(count), int(threads)
    totals = {"sent": 0, "acked": 0, "other": 0}
    lock = threading.Lock()

    def sha(i: int) -> str:
        return hashlib.sha1(b"hookci-bench-queued-%d" % i).hexdigest()

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        sent = acked = other = 0
        for i in range(k, count, threads):
            body = body_of(repo, clone_url, sha(i - 1), sha(i), "queued %d" % i)
            conn.request("POST", path, body=body, headers=headers_of(secret, body))
            resp = conn.getresponse()
            resp.read()
            sent += 1
            if resp.status == 202:
                acked += 1
            else:
                other += 1
        conn.close()
        with lock:
            totals["sent"] += sent
            totals["acked"] += acked
            totals["other"] += other

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print("FLOOD sent=%(sent)d acked=%(acked)d other=%(other)d" % totals)
    return 0 if totals["acked"] == count else 1


ENDED = {"succeeded", "failed", "timed_out", "canceled", "skipped", "interrupted"}


def wait_run(base, run_id, timeout) -> int:
    host, port, _ = target(base)
    deadline = time.monotonic() + float(timeout)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    while True:
        conn.request("GET", "/api/runs/%s" % run_id)
        resp = conn.getresponse()
        answer = resp.read()
        run = json.loads(answer) if resp.status == 200 else {}
        if run.get("status") in ENDED:
            break
        if time.monotonic() > deadline:
            print("client.py: run %s did not end within %s s (%s)" % (run_id, timeout, run.get("status")),
                  file=sys.stderr)
            return 1
        time.sleep(0.02)
    conn.close()
    steps = ",".join(str(s.get("duration_ms")) for s in run.get("steps") or [])
    timings = run.get("timings") or {}
    phases = " ".join(
        "%s=%s" % (name, timings.get(key, "-"))
        for name, key in [("queue_ms", "queue_ms"), ("fetch_ms", "fetch_ms"),
                          ("checkout_ms", "checkout_ms"), ("first_ms", "to_first_step_ms")]
    )
    print("RUN id=%s status=%s step_ms=%s %s" % (run_id, run["status"], steps or "-", phases))
    return 0


def main() -> int:
    if len(sys.argv) == 8 and sys.argv[1] == "post":
        return post(*sys.argv[2:])
    if len(sys.argv) == 8 and sys.argv[1] == "flood":
        return flood(*sys.argv[2:])
    if len(sys.argv) == 5 and sys.argv[1] == "wait-run":
        return wait_run(*sys.argv[2:])
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
