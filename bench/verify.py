#!/usr/bin/env python3
"""Check that every delivery hookci acknowledged (202) is in its store, with one run.

Usage: verify.py ACK_FILE STATE_DIR/hookci.db CONNECTIONS
       verify.py --recorded ACK_FILE RECORDED_FILE CONNECTIONS

The second form checks a receiver without a store (webhook, in bench/intake.sh): its
hook command appends each delivery id it ran for to RECORDED_FILE, and every
acknowledged delivery should be there, once.

ACK_FILE holds the delivery id of every 202 that wrk saw, one a line (bench/intake.lua).
Run it after the daemon was killed (SIGKILL): only what was committed counts.

Prints "acknowledged N, stored N, runs N", details, and a machine-readable line
"VERIFY acked=.. stored=.. runs=.. missing=.. unacked=.. bad_runs=.. ok=0|1".
Exits 1 if an acknowledged delivery is missing or a delivery has not exactly one run.
Stored deliveries that were never acknowledged are expected, up to one per connection:
wrk stops with requests in flight and drops their answers.
"""

import sqlite3
from collections import Counter
import sys


def read_ids(path: str) -> list:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        return []


def recorded(ack_file: str, rec_file: str, conns: int) -> int:
    acked_list = read_ids(ack_file)
    acked = set(acked_list)
    rec_list = read_ids(rec_file)
    rec = set(rec_list)
    lost = sorted(acked - rec)
    unacked = len(rec - acked)
    twice = len(rec_list) - len(rec)
    print("acknowledged %d, recorded %d" % (len(acked_list), len(rec_list)))
    if lost:
        print(
            "  %d acknowledged deliveries were never recorded by the hook command, e.g. %s"
            % (len(lost), ", ".join(lost[:3]))
        )
    if twice:
        print("  %d deliveries were recorded more than once" % twice)
    if unacked:
        note = "expected: wrk drops in-flight answers when it stops"
        if unacked > conns:
            note = "MORE than the %d connections in flight at the end" % conns
        print("  %d recorded deliveries were never acknowledged to wrk (%s)" % (unacked, note))
    print(
        "VERIFY acked=%d stored=%d runs=%d missing=%d unacked=%d bad_runs=%d ok=%d"
        % (len(acked_list), len(acked & rec), len(rec_list), len(lost), unacked, twice,
           int(not lost and not twice))
    )
    return 0


def main() -> int:
    if sys.argv[1] == "--recorded":
        return recorded(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    ack_file, db, conns = sys.argv[1], sys.argv[2], int(sys.argv[3])
    acked_list = read_ids(ack_file)
    acked = set(acked_list)
    repeated_acks = len(acked_list) - len(acked)

    conn = sqlite3.connect("file:%s?mode=ro" % db, uri=True)
    stored = {row[0] for row in conn.execute("SELECT id FROM deliveries")}
    n_deliveries = conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
    n_runs = conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    # Every delivery must match exactly one run (one pipeline, distinct commits).
    # Counted here, not in SQL: runs.delivery_id has no index.
    runs_per_delivery = Counter(
        row[0] for row in conn.execute("SELECT delivery_id FROM runs")
    )
    bad_runs = sum(1 for d in stored if runs_per_delivery.get(d, 0) != 1)
    orphan_runs = sum(n for d, n in runs_per_delivery.items() if d is None or d not in stored)
    by_status = conn.execute(
        "SELECT status, COUNT(*) FROM runs GROUP BY status ORDER BY status"
    ).fetchall()
    conn.close()

    missing = sorted(acked - stored)
    unacked = len(stored - acked)
    print("acknowledged %d, stored %d, runs %d" % (len(acked_list), n_deliveries, n_runs))
    print(
        "  runs by status: %s" % (", ".join("%s %d" % s for s in by_status) or "none")
    )
    ok = True
    if missing:
        ok = False
        print(
            "  FAIL: %d acknowledged deliveries are NOT in the store, e.g. %s"
            % (len(missing), ", ".join(missing[:5]))
        )
    if repeated_acks:
        ok = False
        print("  FAIL: %d delivery ids were acknowledged (202) more than once" % repeated_acks)
    if bad_runs:
        ok = False
        print("  FAIL: %d stored deliveries do not have exactly one run" % bad_runs)
    if orphan_runs:
        ok = False
        print("  FAIL: %d runs belong to no stored delivery" % orphan_runs)
    if unacked:
        note = "expected: wrk drops in-flight answers when it stops"
        if unacked > conns:
            note = "MORE than the %d connections in flight at the end" % conns
        print("  %d stored deliveries were never acknowledged to wrk (%s)" % (unacked, note))
    print(
        "VERIFY acked=%d stored=%d runs=%d missing=%d unacked=%d bad_runs=%d ok=%d"
        % (len(acked_list), n_deliveries, n_runs, len(missing), unacked, bad_runs + orphan_runs, ok)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
