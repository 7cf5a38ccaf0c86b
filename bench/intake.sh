#!/usr/bin/env bash
# Benchmark of signed push intake: wrk POSTs distinct, signed push deliveries to a
# release hookci on loopback at several connection counts, then checks that every
# delivery answered 202 is in the store with exactly one run. The same load goes to the
# bare handler (the ceiling) and to webhook (Debian's package, the same secret and a
# signature rule; its command records each delivery id), whose acknowledged deliveries
# are checked against what its command recorded. See bench/README.md.
#
# Knobs (environment): LEVELS="1 16 64"  DURATION=10s  PAYLOADS=250000  IDLE_SECS=2
#   MAX_PARALLEL_RUNS=2  SKIP_BUILD=1 (use the existing target/release/hookci)
#   KEEP=1 (keep the temp dir: daemon logs, wrk output, state dirs)
#   WEBHOOK=0 (leave webhook out)  DRAIN_SECS=30 (how long webhook may finish its commands)
#   RESULTS=FILE (append one "INTAKE key=value ..." line per measurement, for run.sh)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"
LEVELS=${LEVELS:-"1 16 64"}
DURATION=${DURATION:-10s}
PAYLOADS=${PAYLOADS:-250000}
IDLE_SECS=${IDLE_SECS:-2}
MAX_PARALLEL_RUNS=${MAX_PARALLEL_RUNS:-2}
BIN=${BIN:-"$ROOT/target/release/hookci"}
BARE=${BARE:-"$ROOT/target/release/examples/bare-handler"}
WEBHOOK=${WEBHOOK:-1}
DRAIN_SECS=${DRAIN_SECS:-30}
RESULTS=${RESULTS:-}

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'intake.sh: %s\n' "$*" >&2; exit 1; }

# --- tools and build --------------------------------------------------------------
if ! command -v wrk >/dev/null 2>&1; then
    say "installing wrk"
    apt-get install -y wrk || { apt-get update && apt-get install -y wrk; }
fi
if [ "$WEBHOOK" != 0 ] && ! command -v webhook >/dev/null 2>&1; then
    say "installing webhook"
    apt-get install -y webhook || { apt-get update && apt-get install -y webhook; }
fi
command -v python3 >/dev/null || die "python3 is required"
command -v git >/dev/null || die "git is required"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    say "building hookci (release)"
    (cd "$ROOT" && cargo build --release --bin hookci --example bare-handler)
fi
[ -x "$BIN" ] || die "$BIN missing (build it, or unset SKIP_BUILD)"
[ -x "$BARE" ] || die "$BARE missing (build it, or unset SKIP_BUILD)"

# --- temp dir, cleanup --------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hookci-bench.XXXXXX")
DAEMON_PID=""
SAMPLER_PID=""
BARE_PID=""
REMOTE_PID=""
WEBHOOK_PID=""
cleanup() {
    if [ -n "$BARE_PID" ]; then kill "$BARE_PID" 2>/dev/null || true; fi
    # webhook leads its own process group, with the hook commands it started.
    if [ -n "$WEBHOOK_PID" ]; then kill -KILL -- "-$WEBHOOK_PID" 2>/dev/null || true; fi
    if [ -n "$REMOTE_PID" ]; then kill "$REMOTE_PID" 2>/dev/null || true; fi
    if [ -n "$SAMPLER_PID" ]; then kill "$SAMPLER_PID" 2>/dev/null || true; fi
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -KILL "$DAEMON_PID" 2>/dev/null || true
        wait "$DAEMON_PID" 2>/dev/null || true
    fi
    if [ "${KEEP:-0}" = 1 ]; then
        echo "kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- fixtures: secret, bare repo, pipeline, payloads --------------------------------------
python3 -c 'import secrets; print(secrets.token_hex(32))' >"$WORK/secret"
chmod 600 "$WORK/secret"
git init -q --bare "$WORK/bare.git"
mkdir "$WORK/pipelines"
# The runs' remote accepts connections and never answers, so the two runs the scheduler
# starts wait in their fetch for the whole level, as real builds outlast a burst of
# pushes; the other runs stay queued. Intake is what is measured.
python3 - "$WORK/remote.port" <<'PY' &
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(1024)
open(sys.argv[1], "w").write(str(s.getsockname()[1]))
time.sleep(10**9)
PY
REMOTE_PID=$!
for _ in $(seq 50); do [ -s "$WORK/remote.port" ] && break; sleep 0.1; done
[ -s "$WORK/remote.port" ] || die "the silent remote did not start"
cat >"$WORK/pipelines/bench.yml" <<EOF
repo: bench/repo
clone_url: http://127.0.0.1:$(cat "$WORK/remote.port")/bench/repo.git
on:
  branches: ["main"]
steps:
  - name: noop
    run: "true"
EOF

say "generating $PAYLOADS signed push deliveries"
python3 "$BENCH/gen_payloads.py" "$PAYLOADS" "$WORK/secret" "$WORK/bare.git" "$WORK/payloads.tsv"

rss_kib() { # rss_kib PID FIELD -> value in KiB of FIELD (VmRSS, VmHWM) from /proc
    local key value _
    while read -r key value _; do
        if [ "$key" = "$2:" ]; then echo "$value"; return 0; fi
    done <"/proc/$1/status"
    return 1
}
cpu_ticks() { # cpu_ticks PID -> user + system time of PID in clock ticks
    local rest
    rest=$(sed 's/.*) //' "/proc/$1/stat")
    awk '{ print $12 + $13 }' <<<"$rest"
}
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
ms() { awk -v u="$1" 'BEGIN { printf "%.2f ms", u / 1000 }'; }
result() { # result KEY=VALUE ... -> one line of RESULTS, if asked for
    if [ -n "$RESULTS" ]; then echo "INTAKE $*" >>"$RESULTS"; fi
}
# load OUT ACK_FILE URL [VAR=VALUE ...]: the wrk run of one level against one receiver,
# with intake.lua; VAR=VALUE go to the script's environment.
load() {
    local out=$1 ack=$2 url=$3
    shift 3
    env BENCH_DATA="$WORK/payloads.tsv" BENCH_THREADS="$T" BENCH_ACK_FILE="$ack" "$@" \
        wrk -t"$T" -c"$C" -d"$DURATION" --timeout 10s --latency \
            -s "$BENCH/intake.lua" "$url" >"$out" 2>&1
}
start_sampler() { # start_sampler PID FILE: VmRSS of PID every 100 ms into FILE
    : >"$2"
    ( while rss_kib "$1" VmRSS >>"$2" 2>/dev/null; do sleep 0.1; done ) &
    SAMPLER_PID=$!
}
stop_sampler() { # stop_sampler PID FILE -> the peak of the samples and of VmHWM, KiB
    local hwm peak
    hwm=$(rss_kib "$1" VmHWM 2>/dev/null || echo 0)
    kill "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=""
    peak=$(sort -n "$2" | tail -1)
    peak=${peak:-0}
    [ "$hwm" -gt "$peak" ] && peak=$hwm
    echo "$peak"
}
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# webhook's hooks: "push-J" for every slot J (see intake.lua), each with the same secret,
# a payload-hmac-sha256 rule on X-Hub-Signature-256 and a command that appends the
# delivery id to $2. It answers 200 "slot=J" as soon as the rule holds and runs the
# command after that, which is webhook's default.
write_hooks() { # write_hooks HOOKS_JSON RECORDED_FILE
    python3 - "$1" "$2" "$WORK/secret" "$SLOTS" <<'PY'
import json, sys
out, recorded, secret_file, slots = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
secret = open(secret_file).read().strip()
hooks = [{
    "id": "push-%d" % j,
    "execute-command": "/bin/sh",
    "pass-arguments-to-command": [
        {"source": "string", "name": "-c"},
        {"source": "string", "name": 'printf "%s\\n" "$1" >>"$2"'},
        {"source": "string", "name": "record"},
        {"source": "header", "name": "X-GitHub-Delivery"},
        {"source": "string", "name": recorded},
    ],
    "response-message": "slot=%d" % j,
    "http-methods": ["POST"],
    "trigger-rule": {"match": {
        "type": "payload-hmac-sha256",
        "secret": secret,
        "parameter": {"source": "header", "name": "X-Hub-Signature-256"},
    }},
} for j in range(slots)]
with open(out, "w") as f:
    json.dump(hooks, f, indent=1)
PY
    chmod 600 "$1"
}
pgid_of() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $3 }'; }
group_size() { # group_size PGID -> how many processes are in process group PGID
    cat /proc/[0-9]*/stat 2>/dev/null | awk -v g="$1" '{ sub(/.*\) /, ""); if ($3 == g) n++ } END { print n + 0 }'
}

# Slots per wrk thread: more than the connections one thread holds, so one is free
# whenever a request is made (intake.lua).
SLOTS=0
for C in $LEVELS; do
    T=$(( C < 2 ? C : 2 ))
    PER=$(( (C + T - 1) / T ))
    [ $(( 2 * PER + 4 )) -gt "$SLOTS" ] && SLOTS=$(( 2 * PER + 4 ))
done

declare -A R_CPU R_BARE R_BARE_P99 R_RPS R_P50 R_P99 R_NON2XX R_PEAK R_IDLE R_ACK R_STORED R_RUNS R_NOTE
declare -A R_WH R_WH_P99 R_WH_ACK R_WH_REC R_WH_DRAINED R_WH_IDLE R_WH_PEAK R_WH_NOTE
FAILED=0

for C in $LEVELS; do
    T=$(( C < 2 ? C : 2 ))
    D="$WORK/c$C"
    mkdir -p "$D/state"
    cat >"$D/hookci.yml" <<EOF
listen: 127.0.0.1:0
pipelines: $WORK/pipelines
state_dir: $D/state
webhook_secret_file: $WORK/secret
max_parallel_runs: $MAX_PARALLEL_RUNS
# Every acknowledged delivery's run is checked afterwards: prune nothing.
retention: { runs: 1000000000, days: 36500 }
EOF
    # The previous level's writes (its store, then the bare handler's) are still being
    # flushed by the kernel: let that finish first, so it does not slow this level.
    sync
    say "connections=$C threads=$T: starting hookci with an empty store"
    "$BIN" serve -c "$D/hookci.yml" --listen 127.0.0.1:0 2>"$D/daemon.log" &
    DAEMON_PID=$!
    ADDR=""
    for _ in $(seq 100); do
        ADDR=$(grep -m1 'listening' "$D/daemon.log" 2>/dev/null | grep -o 'addr=[^ ]*' | cut -d= -f2 || true)
        [ -n "$ADDR" ] && break
        kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$D/daemon.log" >&2; die "hookci exited at start"; }
        sleep 0.1
    done
    [ -n "$ADDR" ] || { cat "$D/daemon.log" >&2; die "hookci did not log 'listening' within 10 s"; }
    case "$ADDR" in 127.*) ;; *) die "refusing to load non-loopback address $ADDR" ;; esac

    sleep "$IDLE_SECS"
    IDLE=$(rss_kib "$DAEMON_PID" VmRSS)
    echo "listening on $ADDR (pid $DAEMON_PID), idle RSS after ${IDLE_SECS}s: $(mib "$IDLE") MiB" >&2

    start_sampler "$DAEMON_PID" "$D/rss.samples"
    CPU0=$(cpu_ticks "$DAEMON_PID")
    set +e
    load "$D/wrk.txt" "$D/acked.txt" "http://$ADDR/webhook"
    WRK_RC=$?
    set -e
    grep -v '^BENCH ' "$D/wrk.txt" >&2 || true

    ALIVE=1
    kill -0 "$DAEMON_PID" 2>/dev/null || ALIVE=0
    CPU1=$(cpu_ticks "$DAEMON_PID" 2>/dev/null || echo "$CPU0")
    PEAK=$(stop_sampler "$DAEMON_PID" "$D/rss.samples")
    # A crash-style stop: only what the store committed survives it.
    kill -KILL "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
    DAEMON_PID=""

    NOTE=""
    if [ "$ALIVE" = 0 ]; then
        NOTE="DAEMON DIED during the run"
        FAILED=1
        echo "FAIL: hookci was not running at the end of the load; log tail:" >&2
        tail -20 "$D/daemon.log" >&2
    fi
    LINE=$(grep '^BENCH ' "$D/wrk.txt" || true)
    if [ "$WRK_RC" != 0 ] || [ -z "$LINE" ]; then
        echo "FAIL: wrk exited $WRK_RC without a summary" >&2
        FAILED=1
        R_RPS[$C]="-"; R_P50[$C]="-"; R_P99[$C]="-"; R_NON2XX[$C]="-"
        R_PEAK[$C]=$(mib "$PEAK"); R_IDLE[$C]=$(mib "$IDLE"); R_ACK[$C]="-"; R_STORED[$C]="-"
        R_NOTE[$C]="wrk failed $NOTE"
        continue
    fi
    field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$LINE"; }
    echo "$LINE" >&2

    set +e
    python3 "$BENCH/verify.py" "$D/acked.txt" "$D/state/hookci.db" "$C" | tee "$D/verify.txt" >&2
    VRC=${PIPESTATUS[0]}
    set -e
    VLINE=$(grep '^VERIFY ' "$D/verify.txt" || true)
    vfield() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$VLINE"; }
    if [ "$VRC" != 0 ]; then
        FAILED=1
        NOTE="$NOTE DURABILITY CHECK FAILED"
        echo "FAIL: durability check failed at $C connections (kept $WORK)" >&2
        KEEP=1
    fi
    [ "$(field noid)" != 0 ] && NOTE="$NOTE $(field noid) 202s without a delivery id;"
    [ "$(field wrapped)" != 0 ] && NOTE="$NOTE payloads ran out (raise PAYLOADS);"
    ERRS=$(( $(field err_connect) + $(field err_read) + $(field err_write) + $(field err_timeout) ))
    [ "$ERRS" != 0 ] && NOTE="$NOTE socket errors: connect $(field err_connect) read $(field err_read) write $(field err_write) timeout $(field err_timeout);"
    [ "$(field statuses)" != "-" ] && NOTE="$NOTE statuses other than 202: $(field statuses);"
    LOGPROBLEMS=$(grep -cE ' (ERROR|WARN) ' "$D/daemon.log" || true)
    if [ "$LOGPROBLEMS" != 0 ]; then
        NOTE="$NOTE $LOGPROBLEMS ERROR/WARN log lines;"
        echo "daemon ERROR/WARN lines ($LOGPROBLEMS), first 5:" >&2
        grep -E ' (ERROR|WARN) ' "$D/daemon.log" | head -5 >&2
    fi

    R_RPS[$C]=$(awk -v r="$(field rps)" 'BEGIN { printf "%.0f", r }')
    R_P50[$C]=$(ms "$(field p50_us)")
    R_P99[$C]=$(ms "$(field p99_us)")
    R_NON2XX[$C]=$(field non2xx)
    R_PEAK[$C]=$(mib "$PEAK")
    R_IDLE[$C]=$(mib "$IDLE")
    R_ACK[$C]=$(vfield acked)
    R_STORED[$C]=$(vfield stored)
    R_RUNS[$C]=$(vfield runs)
    # CPU the daemon spent per acknowledged push (clock ticks are 10 ms): a figure the
    # other processes on the machine (wrk among them) disturb far less than req/s.
    R_CPU[$C]=$(awk -v t=$(( CPU1 - CPU0 )) -v hz="$(getconf CLK_TCK)" -v n="${R_ACK[$C]:-0}" \
        'BEGIN { if (n > 0) printf "%.0f", t / hz * 1e6 / n; else print "-" }')
    R_NOTE[$C]=$NOTE
    result target=hookci conns="$C" rps="${R_RPS[$C]}" p99_us="$(field p99_us)" \
        acked="${R_ACK[$C]}" stored="${R_STORED[$C]}" runs="${R_RUNS[$C]}" \
        missing="$(vfield missing)" idle_kib="$IDLE" peak_kib="$PEAK" ok="$(vfield ok)"

    # The ceiling, measured in the same run: warp answering 202 and nothing else.
    say "connections=$C: bare warp handler"
    "$BARE" 127.0.0.1:0 2>"$D/bare.log" &
    BARE_PID=$!
    BADDR=""
    for _ in $(seq 100); do
        BADDR=$(grep -m1 'listening' "$D/bare.log" 2>/dev/null | grep -o 'addr=[^ ]*' | cut -d= -f2 || true)
        [ -n "$BADDR" ] && break
        sleep 0.1
    done
    case "$BADDR" in 127.*) ;; *) die "bare handler did not start on loopback" ;; esac
    set +e
    load "$D/bare-wrk.txt" "$D/bare-acked.txt" "http://$BADDR/webhook"
    set -e
    kill "$BARE_PID" 2>/dev/null || true
    wait "$BARE_PID" 2>/dev/null || true
    BARE_PID=""
    BLINE=$(grep '^BENCH ' "$D/bare-wrk.txt" || true)
    R_BARE[$C]=$(awk -v r="$(sed -n 's/.* rps=\([^ ]*\).*/\1/p' <<<"$BLINE")" 'BEGIN { printf "%.0f", r }')
    R_BARE_P99[$C]=$(ms "$(sed -n 's/.* p99_us=\([^ ]*\).*/\1/p' <<<"$BLINE")")
    result target=bare conns="$C" rps="${R_BARE[$C]}" \
        p99_us="$(sed -n 's/.* p99_us=\([^ ]*\).*/\1/p' <<<"$BLINE")"

    [ "$WEBHOOK" != 0 ] || continue
    # What users run today, measured in the same run: webhook with the same secret and a
    # signature rule. The acknowledged deliveries are looked for in what its commands
    # recorded twice: when the load ends (what a crash then keeps, as for hookci above:
    # webhook keeps nothing else), and once it was left to finish its commands (up to
    # DRAIN_SECS); then its whole process group is killed.
    say "connections=$C: webhook"
    sync
    write_hooks "$D/hooks.json" "$D/webhook-recorded.txt"
    WPORT=$(free_port)
    setsid webhook -hooks "$D/hooks.json" -ip 127.0.0.1 -port "$WPORT" >"$D/webhook.log" 2>&1 &
    WEBHOOK_PID=$!
    UP=0
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$WPORT") 2>/dev/null; then UP=1; break; fi
        kill -0 "$WEBHOOK_PID" 2>/dev/null || break
        sleep 0.1
    done
    [ "$UP" = 1 ] || { cat "$D/webhook.log" >&2; die "webhook did not listen on 127.0.0.1:$WPORT"; }
    [ "$(pgid_of "$WEBHOOK_PID")" = "$WEBHOOK_PID" ] || die "webhook does not lead its own process group"
    sleep "$IDLE_SECS"
    WIDLE=$(rss_kib "$WEBHOOK_PID" VmRSS)
    start_sampler "$WEBHOOK_PID" "$D/webhook-rss.samples"
    set +e
    load "$D/webhook-wrk.txt" "$D/webhook-acked.txt" "http://127.0.0.1:$WPORT/" \
        BENCH_SLOTS="$SLOTS" BENCH_SLOT_PATH=/hooks/push-
    set -e
    WPEAK=$(stop_sampler "$WEBHOOK_PID" "$D/webhook-rss.samples")
    touch "$D/webhook-recorded.txt"
    cp "$D/webhook-recorded.txt" "$D/webhook-recorded-at-end.txt"
    # Left to finish: until no hook command is left in its process group and nothing
    # was recorded for a second.
    LINES=-1
    for _ in $(seq "$DRAIN_SECS"); do
        sleep 1
        NOW=$(wc -l <"$D/webhook-recorded.txt")
        [ "$NOW" = "$LINES" ] && [ "$(group_size "$WEBHOOK_PID")" -le 1 ] && break
        LINES=$NOW
    done
    kill -KILL -- "-$WEBHOOK_PID" 2>/dev/null || true
    wait "$WEBHOOK_PID" 2>/dev/null || true
    WEBHOOK_PID=""
    WLINE=$(grep '^BENCH ' "$D/webhook-wrk.txt" || true)
    [ -n "$WLINE" ] || { cat "$D/webhook-wrk.txt" >&2; die "wrk against webhook gave no summary"; }
    echo "$WLINE" >&2
    wfield() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$WLINE"; }
    echo "webhook, when the load ended:" >&2
    python3 "$BENCH/verify.py" --recorded "$D/webhook-acked.txt" "$D/webhook-recorded-at-end.txt" "$C" \
        | tee "$D/webhook-verify.txt" >&2
    echo "webhook, left to finish (up to $DRAIN_SECS s):" >&2
    python3 "$BENCH/verify.py" --recorded "$D/webhook-acked.txt" "$D/webhook-recorded.txt" "$C" \
        | tee "$D/webhook-verify-drained.txt" >&2
    WV=$(grep '^VERIFY ' "$D/webhook-verify.txt")
    R_WH_DRAINED[$C]=$(sed -n 's/.* stored=\([^ ]*\).*/\1/p' <<<"$(grep '^VERIFY ' "$D/webhook-verify-drained.txt")")
    R_WH[$C]=$(awk -v r="$(wfield rps)" 'BEGIN { printf "%.0f", r }')
    R_WH_P99[$C]=$(ms "$(wfield p99_us)")
    R_WH_ACK[$C]=$(sed -n 's/.* acked=\([^ ]*\).*/\1/p' <<<"$WV")
    R_WH_REC[$C]=$(sed -n 's/.* stored=\([^ ]*\).*/\1/p' <<<"$WV")
    R_WH_IDLE[$C]=$(mib "$WIDLE")
    R_WH_PEAK[$C]=$(mib "$WPEAK")
    WNOTE=""
    [ "$(wfield noslot)" != 0 ] && WNOTE="$WNOTE $(wfield noslot) slots taken over (broken connections);"
    [ "$(wfield noid)" != 0 ] && WNOTE="$WNOTE $(wfield noid) 200s naming no slot;"
    [ "$(wfield statuses)" != "-" ] && WNOTE="$WNOTE statuses other than 200: $(wfield statuses);"
    [ "$(wfield wrapped)" != 0 ] && WNOTE="$WNOTE payloads ran out (raise PAYLOADS);"
    R_WH_NOTE[$C]=$WNOTE
    result target=webhook conns="$C" rps="${R_WH[$C]}" p99_us="$(wfield p99_us)" \
        acked="${R_WH_ACK[$C]}" stored="${R_WH_REC[$C]}" drained="${R_WH_DRAINED[$C]}" \
        idle_kib="$WIDLE" peak_kib="$WPEAK"
done

# --- report ---------------------------------------------------------------------------------
say "results"
{
    echo "hookci $(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo '?'), $(nproc) cores, wrk $DURATION per level, --timeout 10s, max_parallel_runs $MAX_PARALLEL_RUNS"
    echo
    echo "| connections | req/s | p50 | p99 | non-2xx | peak RSS MiB | stored/acked | CPU µs/push | bare req/s (p99) | intake/bare | webhook req/s (p99) | webhook recorded/acked | intake/webhook |"
    echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for C in $LEVELS; do
        RATIO=$(awk -v a="${R_RPS[$C]}" -v b="${R_BARE[$C]:-0}" 'BEGIN { if (b > 0) printf "%.0f%%", 100 * a / b; else print "-" }')
        WRATIO=$(awk -v a="${R_RPS[$C]}" -v b="${R_WH[$C]:-0}" 'BEGIN { if (b > 0) printf "%.2f×", a / b; else print "-" }')
        echo "| $C | ${R_RPS[$C]} | ${R_P50[$C]} | ${R_P99[$C]} | ${R_NON2XX[$C]} | ${R_PEAK[$C]} | ${R_STORED[$C]}/${R_ACK[$C]} | ${R_CPU[$C]:--} | ${R_BARE[$C]:--} (${R_BARE_P99[$C]:--}) | $RATIO | ${R_WH[$C]:--} (${R_WH_P99[$C]:--}) | ${R_WH_REC[$C]:--}/${R_WH_ACK[$C]:--} | $WRATIO |"
    done
    echo
    IDLES=""
    for C in $LEVELS; do IDLES="$IDLES${IDLES:+ / }${R_IDLE[$C]}"; done
    echo "Idle RSS after startup (${IDLE_SECS} s, before load): $IDLES MiB (one per level)."
    for C in $LEVELS; do
        echo "- $C connections: runs ${R_RUNS[$C]:--}.${R_NOTE[$C]:+ ${R_NOTE[$C]}}"
        if [ -n "${R_WH[$C]:-}" ]; then
            echo "  webhook: RSS idle ${R_WH_IDLE[$C]} MiB, peak ${R_WH_PEAK[$C]} MiB; ${R_WH_DRAINED[$C]} of the acknowledged deliveries recorded once left to finish.${R_WH_NOTE[$C]:+ ${R_WH_NOTE[$C]}}"
        fi
    done
}
if [ "$FAILED" != 0 ]; then
    echo
    echo "FAILED: see the FAIL lines above" >&2
    exit 1
fi
