#!/usr/bin/env bash
# Every speed claim of hookci, each measured beside its comparison in the same run, and
# printed as one Markdown table (what, hookci, comparison, ratio, target). See
# bench/README.md. Everything runs on this machine; every request goes to 127.0.0.1.
#
#   bash bench/run.sh              # the full run (as root on a fresh Debian machine)
#   QUICK=1 bash bench/run.sh      # small sizes, for trying changes to this script
#
# Knobs (environment; QUICK=1 lowers the defaults):
#   LEVELS="1 16 64" INTAKE_DURATION=10s PAYLOADS=250000   intake (bench/intake.sh)
#   DRAIN_SECS=30                                          webhook left to finish
#   LARGE_FILES=5000 SMALL_FILES=10 ROUNDS=5               push to first step
#   LOG_MB=200 LOG_ROUNDS=3                                the step printing LOG_MB MB
#   PIPELINES=1000                                         matching
#   QUEUED=10000                                           RSS with QUEUED queued runs
#   SKIP_BUILD=1 (use target/release as it is)  KEEP=1 (keep the temp dir)
#   HOOKCI_BIN=PATH   another hookci binary (e.g. a copy of the one before a change, to
#                     alternate the two in the same conditions); the intake rows keep
#                     target/release's
#   SECTIONS="intake first_step log match memory"          which parts run (all by default)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"
if [ "${QUICK:-0}" = 1 ]; then
    : "${LEVELS:=1 16}" "${INTAKE_DURATION:=2s}" "${PAYLOADS:=30000}" "${LARGE_FILES:=500}"
    : "${ROUNDS:=2}" "${LOG_MB:=20}" "${LOG_ROUNDS:=1}" "${QUEUED:=500}" "${DRAIN_SECS:=5}"
fi
LEVELS=${LEVELS:-"1 16 64"}
INTAKE_DURATION=${INTAKE_DURATION:-10s}
PAYLOADS=${PAYLOADS:-250000}
DRAIN_SECS=${DRAIN_SECS:-30}
LARGE_FILES=${LARGE_FILES:-5000}
SMALL_FILES=${SMALL_FILES:-10}
ROUNDS=${ROUNDS:-5}
LOG_MB=${LOG_MB:-200}
LOG_ROUNDS=${LOG_ROUNDS:-3}
PIPELINES=${PIPELINES:-1000}
QUEUED=${QUEUED:-10000}
SECTIONS=${SECTIONS:-"intake first_step log match memory"}
has() { [[ " $SECTIONS " == *" $1 "* ]]; }   # has SECTION: whether SECTIONS names it
BIN=${HOOKCI_BIN:-"$ROOT/target/release/hookci"}
MATCH="$ROOT/target/release/examples/match-bench"
CLIENT="$BENCH/client.py"
STARTED=$(date +%s)
REV=$(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo '?')
[ -z "${HOOKCI_BIN:-}" ] || REV="$REV (but hookci itself: $HOOKCI_BIN)"

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

# --- tools and build ------------------------------------------------------------------
MISSING=()
for pair in wrk:wrk webhook:webhook git:git python3:python3 setsid:util-linux; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || MISSING+=("${pair#*:}")
done
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    command -v cc >/dev/null 2>&1 || MISSING+=(gcc)
    command -v pkg-config >/dev/null 2>&1 || MISSING+=(pkg-config)
    [ -e /usr/include/openssl/ssl.h ] || MISSING+=(libssl-dev)
fi
if [ "${#MISSING[@]}" -gt 0 ]; then
    say "installing ${MISSING[*]}"
    [ "$(id -u)" = 0 ] || die "installing ${MISSING[*]} needs root (apt-get)"
    apt-get install -y "${MISSING[@]}" || { apt-get update && apt-get install -y "${MISSING[@]}"; }
fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    command -v cargo >/dev/null 2>&1 || die "cargo is missing: install a Rust toolchain (rustup) first"
    say "building hookci, the bare handler and the matcher benchmark (release)"
    (cd "$ROOT" && cargo build --release --locked --bin hookci --example bare-handler --example match-bench)
fi
for f in "$BIN" "$MATCH" "$ROOT/target/release/examples/bare-handler"; do
    [ -x "$f" ] || die "$f missing (build it, or unset SKIP_BUILD)"
done

# --- temp dir, cleanup -------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hookci-run.XXXXXX")
DPID=""        # the hookci daemon of the current section
DLOG=""
INTAKE_PID=""  # bench/intake.sh, which cleans up after itself on SIGTERM
cleanup() {
    if [ -n "$INTAKE_PID" ] && kill -0 "$INTAKE_PID" 2>/dev/null; then
        kill -TERM "$INTAKE_PID" 2>/dev/null || true
        wait "$INTAKE_PID" 2>/dev/null || true
    fi
    # A blocked step waits for this file (see the queued-runs section); it looks every
    # 0.1 s, so give it the time to see the file before the temp dir goes.
    if [ -d "$WORK/queue" ]; then
        : >"$WORK/release" 2>/dev/null || true
        sleep 0.3
    fi
    if [ -n "$DPID" ] && kill -0 "$DPID" 2>/dev/null; then
        kill -TERM "$DPID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$DPID" 2>/dev/null || true
        wait "$DPID" 2>/dev/null || true
    fi
    if [ "${KEEP:-0}" = 1 ]; then
        echo "kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

python3 -c 'import secrets; print(secrets.token_hex(32))' >"$WORK/secret"
chmod 600 "$WORK/secret"
BENCH_TOKEN=$(python3 -c 'import secrets; print("tok-" + secrets.token_hex(16))')

# --- helpers ----------------------------------------------------------------------------
rss_kib() { # rss_kib PID FIELD -> FIELD (VmRSS, VmHWM) of PID in KiB
    local key value _
    while read -r key value _; do
        if [ "$key" = "$2:" ]; then echo "$value"; return 0; fi
    done <"/proc/$1/status"
    return 1
}
kv() { sed -n "s/.*\\b$1=\\([^ ]*\\).*/\\1/p" <<<"$2"; }   # kv KEY LINE -> value
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print ""; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
now_ns() { date +%s%N; }
fmt_ms() { awk -v v="$1" 'BEGIN { if (v == "") print "-"; else if (v < 10) printf "%.1f ms", v; else printf "%.0f ms", v }'; }
fmt_mib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b + 0 == 0) print "-"; else printf "%.2f×", a / b }'; }
verdict() { # verdict VALUE OP LIMIT -> "met" or "not met"
    awk -v v="$1" -v op="$2" -v l="$3" 'BEGIN {
        if (v == "") { print "not measured"; exit }
        ok = (op == "<=") ? (v + 0 <= l + 0) : (v + 0 >= l + 0)
        print ok ? "met" : "not met" }'
}

# A config for one section's daemon: $1 file, $2 pipelines dir, $3 state dir, then extra
# lines. Reconcile is off: it would list remotes in the background during measurements.
write_config() {
    local file=$1 pipelines=$2 state=$3
    shift 3
    {
        echo "listen: 127.0.0.1:0"
        echo "pipelines: $pipelines"
        echo "state_dir: $state"
        echo "webhook_secret_file: $WORK/secret"
        echo "reconcile_interval: 0s"
        echo "shutdown_grace: 2s"
        echo "step_grace: 1s"
        echo "retention: { runs: 1000000000, days: 36500 }"
        for line in "$@"; do echo "$line"; done
    } >"$file"
}

# start_daemon CONFIG LOG [VAR=VALUE ...]: hookci serve; sets DPID and URL.
start_daemon() {
    local config=$1 log=$2 addr=""
    shift 2
    env "$@" "$BIN" serve -c "$config" 2>"$log" &
    DPID=$!
    DLOG=$log
    for _ in $(seq 100); do
        addr=$(grep -m1 'listening' "$log" 2>/dev/null | grep -o 'addr=[^ ]*' | cut -d= -f2 || true)
        [ -n "$addr" ] && break
        kill -0 "$DPID" 2>/dev/null || { cat "$log" >&2; die "hookci exited at start"; }
        sleep 0.1
    done
    case "$addr" in 127.0.0.1:*) ;; *) cat "$log" >&2; die "hookci is not listening on 127.0.0.1 ($addr)" ;; esac
    URL="http://$addr"
}

stop_daemon() { # SIGTERM: running steps are killed after shutdown_grace, the rest stays queued
    kill -TERM "$DPID" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$DPID" 2>/dev/null; then
        echo "hookci did not stop within 15 s of SIGTERM; killing it" >&2
        kill -KILL "$DPID" 2>/dev/null || true
    fi
    wait "$DPID" 2>/dev/null || true
    DPID=""
}

# push REPO CLONE_URL BEFORE AFTER -> "POST t0=.. status=.. run=.." (fails unless 2xx)
push() { python3 "$CLIENT" post "$URL/webhook" "$WORK/secret" "$@"; }
wait_run() { python3 "$CLIENT" wait-run "$URL" "$1" "${2:-300}"; }
wait_gone() { # wait_gone PATH SECS: until PATH no longer exists
    local i
    for ((i = 0; i < $2 * 100; i++)); do
        [ -e "$1" ] || return 0
        sleep 0.01
    done
    die "$1 was still there after $2 s"
}
wait_file() { # wait_file PATH SECS: until PATH is non-empty
    local i
    for ((i = 0; i < $2 * 100; i++)); do
        [ -s "$1" ] && return 0
        kill -0 "$DPID" 2>/dev/null || { tail -20 "$DLOG" >&2; die "hookci died"; }
        sleep 0.01
    done
    tail -20 "$DLOG" >&2
    die "$1 did not appear within $2 s"
}

# --- fixtures: source repositories --------------------------------------------------------
# Each has its files in commit 1, then commits that change one file each; NEXT_* is the
# next commit nobody has pushed yet. `main` is moved to a commit just before it is pushed
# (hookci fetches the pushed ref), so each fetch brings exactly one new commit.
declare -A NEXT
make_repo() { # make_repo NAME FILES CHANGES
    local dir="$WORK/src-$1.git"
    git init -q --bare "$dir"
    git -C "$dir" symbolic-ref HEAD refs/heads/main
    python3 "$BENCH/gen_repo.py" "$2" "$3" | git -C "$dir" fast-import --quiet --export-marks="$WORK/marks-$1"
    sort -t: -k2 -n "$WORK/marks-$1" | awk '{ print $2 }' >"$WORK/commits-$1"
    NEXT[$1]=1
}
commit_at() { sed -n "${2}p" "$WORK/commits-$1"; }   # commit_at NAME N -> commit N (1-based)
# take NAME -> the next unpushed commit of NAME, with `main` moved to it; sets BEFORE too
take() {
    local n=${NEXT[$1]}
    AFTER=$(commit_at "$1" "$n")
    [ -n "$AFTER" ] || die "repository $1 ran out of commits"
    if [ "$n" = 1 ]; then BEFORE=0000000000000000000000000000000000000000; else BEFORE=$(commit_at "$1" $((n - 1))); fi
    git -C "$WORK/src-$1.git" update-ref refs/heads/main "$AFTER"
    NEXT[$1]=$((n + 1))
}

# The table, row by row: what | hookci | comparison | ratio | target
ROWS=()
row() { ROWS+=("| $1 | $2 | $3 | $4 | $5 |"); }
NOTES=()

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# ===== 1. signed push intake: hookci, the bare handler, webhook =============================
if has intake; then
say "intake at $LEVELS connections (bench/intake.sh: hookci, bare handler, webhook)"
RESULTS="$WORK/intake.results" SKIP_BUILD=1 LEVELS="$LEVELS" DURATION="$INTAKE_DURATION" \
    PAYLOADS="$PAYLOADS" DRAIN_SECS="$DRAIN_SECS" KEEP="${KEEP:-0}" bash "$BENCH/intake.sh" >"$WORK/intake.md" &
INTAKE_PID=$!
set +e
wait "$INTAKE_PID"
INTAKE_RC=$?
set -e
INTAKE_PID=""
cat "$WORK/intake.md" >&2
[ "$INTAKE_RC" = 0 ] || NOTES+=("bench/intake.sh exited $INTAKE_RC (a durability check failed or the daemon died): see its output above the table.")
intake() { grep "^INTAKE target=$1 conns=$2 " "$WORK/intake.results" || true; }   # intake TARGET CONNS
LAST_LEVEL=""
for C in $LEVELS; do
    LAST_LEVEL=$C
    H=$(intake hookci "$C"); B=$(intake bare "$C"); W=$(intake webhook "$C")
    HRPS=$(kv rps "$H"); BRPS=$(kv rps "$B"); WRPS=$(kv rps "$W")
    # "stored" counts deliveries that are in the store and were acknowledged; a few more
    # are stored whose answer wrk dropped when it stopped (see bench/intake.sh).
    HA=$(kv acked "$H"); HM=$(kv missing "$H"); WA=$(kv acked "$W"); WS=$(kv stored "$W"); WD=$(kv drained "$W")
    HLOST=${HM:-0}
    WLOST=$(( ${WA:-0} - ${WS:-0} ))
    HCELL="$HRPS/s, $(( ${HA:-0} - HLOST )) of $HA acked stored ($HLOST lost)"
    TARGET="—"
    if [ "$C" = 64 ]; then
        OK=$(verdict "$(awk -v a="$HRPS" -v b="$WRPS" 'BEGIN { if (b > 0) print a / b }')" ">=" 2.5)
        [ "$HLOST" = 0 ] || OK="not met"
        TARGET="≥ 2.50× webhook, 0 acked lost: $OK"
    fi
    row "signed push intake, $C conn., vs webhook" "$HCELL" \
        "webhook: $WRPS/s, $WS of $WA acked recorded ($WLOST lost; $(( ${WA:-0} - ${WD:-0} )) still lost when left up to ${DRAIN_SECS} s to finish)" \
        "$(ratio "$HRPS" "$WRPS")" "$TARGET"
    row "signed push intake, $C conn., vs bare handler" "$HRPS/s" "bare handler: $BRPS/s" \
        "$(ratio "$HRPS" "$BRPS")" "—"
done

fi

# ===== 2. push to first step =============================================================
say "generating the source repositories ($SMALL_FILES and $LARGE_FILES files)"
# Commits needed: a warm push and 2 per round (hookci, then git) for each of the two modes,
# and the pushes of the log and queue sections on the small one.
make_repo small "$SMALL_FILES" $(( 4 * ROUNDS + 4 * LOG_ROUNDS + 8 ))
make_repo large "$LARGE_FILES" $(( 4 * ROUNDS + 4 ))

if has first_step; then
REUSE=0
mkdir -p "$WORK/reuse-check"
cat >"$WORK/reuse-check/probe.yml" <<EOF
repo: bench/probe
workspace: reuse
steps:
  - run: "true"
EOF
if "$BIN" check --pipelines "$WORK/reuse-check" >"$WORK/reuse-check.out" 2>&1; then
    REUSE=1
fi

# first_step NAME MODE: hookci's push to first step against git fetch + worktree add, both
# on the same mirror (hookci's, warmed by a first push), ROUNDS times, alternating.
first_step() {
    local name=$1 mode=$2 d="$WORK/first-$1-$2" r out res run t0 mark mirror wt g0 g1 g2
    mkdir -p "$d/pipelines" "$d/marks"
    {
        echo "repo: bench/$name"
        echo "clone_url: file://$WORK/src-$name.git"
        echo "on: { branches: [main] }"
        [ "$mode" = reuse ] && echo "workspace: reuse"
        echo "env: { BENCH_MARKS: \"$d/marks\" }"
        echo "steps:"
        echo "  - name: first"
        echo "    run: date +%s%N >\"\$BENCH_MARKS/\$HOOKCI_RUN_ID\""
    } >"$d/pipelines/first.yml"
    write_config "$d/hookci.yml" "$d/pipelines" "$d/state" "max_parallel_runs: 2"
    start_daemon "$d/hookci.yml" "$d/daemon.log"
    take "$name"
    out=$(push "bench/$name" "file://$WORK/src-$name.git" "$BEFORE" "$AFTER")
    run=$(kv run "$out")
    res=$(wait_run "$run" 600)
    [ "$(kv status "$res")" = succeeded ] || { tail -20 "$DLOG" >&2; die "the warm-up run $run did not succeed: $res"; }
    mirror="$d/state/mirrors/local/bench/$name.git"
    [ -d "$mirror" ] || die "no mirror at $mirror"
    : >"$d/hookci.ms"; : >"$d/git.ms"; : >"$d/fetch.ms"; : >"$d/after.ms"; : >"$d/own.ms"; : >"$d/checkout.ms"; : >"$d/wt.ms"
    for ((r = 1; r <= ROUNDS; r++)); do
        take "$name"
        out=$(push "bench/$name" "file://$WORK/src-$name.git" "$BEFORE" "$AFTER")
        t0=$(kv t0 "$out")
        run=$(kv run "$out")
        # The step wrote its start time; when it is read does not matter.
        res=$(wait_run "$run" 300)
        [ "$(kv status "$res")" = succeeded ] || { tail -20 "$DLOG" >&2; die "run $run did not succeed: $res"; }
        mark=$(cat "$d/marks/$run")
        echo "$(( (mark - t0) / 1000 ))" | awk '{ print $1 / 1000 }' >>"$d/hookci.ms"
        # hookci's own phases (GET /api/runs/ID): what is left of its push to first step
        # once its queue wait and fetch are taken out, and its checkout alone.
        awk -v t="$(tail -1 "$d/hookci.ms")" -v q="$(kv queue_ms "$res")" -v f="$(kv fetch_ms "$res")" \
            'BEGIN { print t - q - f }' >>"$d/after.ms"
        kv checkout_ms "$res" >>"$d/checkout.ms"
        # The same from the run's own timings alone, with no clock of this script in it.
        awk -v t="$(kv first_ms "$res")" -v q="$(kv queue_ms "$res")" -v f="$(kv fetch_ms "$res")" \
            'BEGIN { print t - q - f }' >>"$d/own.ms"
        # The scheduler removes a fresh run's workspace after the run is finished: git is
        # not timed while hookci still deletes its files.
        wait_gone "$d/state/workspaces/$run" 120

        take "$name"
        wt="$d/wt-$r"
        g0=$(now_ns)
        git -c gc.auto=0 -C "$mirror" fetch --quiet --no-tags "file://$WORK/src-$name.git" "+refs/heads/main:refs/heads/main"
        g1=$(now_ns)
        git -c gc.auto=0 -C "$mirror" worktree add --quiet --detach "$wt" "$AFTER"
        g2=$(now_ns)
        git -C "$mirror" worktree remove --force "$wt"
        awk -v a="$g0" -v b="$g2" 'BEGIN { print (b - a) / 1e6 }' >>"$d/git.ms"
        awk -v a="$g0" -v b="$g1" 'BEGIN { print (b - a) / 1e6 }' >>"$d/fetch.ms"
        awk -v a="$g1" -v b="$g2" 'BEGIN { print (b - a) / 1e6 }' >>"$d/wt.ms"
        echo "$name $mode round $r: hookci $(tail -1 "$d/hookci.ms") ms ($res), git $(tail -1 "$d/git.ms") ms (fetch $(tail -1 "$d/fetch.ms") ms, worktree add $(tail -1 "$d/wt.ms") ms)" >&2
    done
    stop_daemon
    FS_HOOKCI=$(median <"$d/hookci.ms")
    FS_GIT=$(median <"$d/git.ms")
    FS_FETCH=$(median <"$d/fetch.ms")
    FS_AFTER=$(median <"$d/after.ms")
    FS_OWN=$(median <"$d/own.ms")
    FS_CHECKOUT=$(median <"$d/checkout.ms")
    FS_WT=$(median <"$d/wt.ms")
}

for name in small large; do
    files=$SMALL_FILES
    [ "$name" = large ] && files=$LARGE_FILES
    say "push to first step, $files files, fresh workspace"
    first_step "$name" fresh
    TARGET="—"
    if [ "$name" = large ]; then
        TARGET="≤ 1.00× git: $(verdict "$(awk -v a="$FS_HOOKCI" -v b="$FS_GIT" 'BEGIN { print a / b }')" "<=" 1.0)"
    fi
    row "push to first step, $files files, fresh workspace (median of $ROUNDS)" "$(fmt_ms "$FS_HOOKCI")" \
        "git fetch + worktree add --detach: $(fmt_ms "$FS_GIT")" "$(ratio "$FS_HOOKCI" "$FS_GIT")" "$TARGET"
    TARGET="—"
    if [ "$name" = large ]; then
        TARGET="≤ 1.00× git worktree add: $(verdict "$(awk -v a="$FS_CHECKOUT" -v b="$FS_WT" 'BEGIN { print a / b }')" "<=" 1.0)"
    fi
    row "fresh checkout alone, $files files (the run's checkout_ms; median of $ROUNDS)" "$(fmt_ms "$FS_CHECKOUT")" \
        "git worktree add --detach: $(fmt_ms "$FS_WT")" "$(ratio "$FS_CHECKOUT" "$FS_WT")" "$TARGET"
done
for name in small large; do
    files=$SMALL_FILES
    [ "$name" = large ] && files=$LARGE_FILES
    WHAT="push to first step, $files files, reused workspace, one file changed"
    if [ "$REUSE" != 1 ]; then
        row "$WHAT" "n/a (workspace: reuse not available)" "—" "—" \
            "$([ "$name" = large ] && echo "≤ 100 ms after the fetch" || echo "—")"
        continue
    fi
    say "push to first step, $files files, reused workspace"
    first_step "$name" reuse
    # "After the fetch": the push to first step less hookci's own queue wait and fetch,
    # as the run records them (its update of the workspace is checkout_ms).
    TARGET="—"
    [ "$name" = large ] && TARGET="≤ 100 ms after the fetch: $(verdict "$FS_AFTER" "<=" 100)"
    row "$WHAT (median of $ROUNDS)" "$(fmt_ms "$FS_HOOKCI") ($(fmt_ms "$FS_AFTER") after the fetch; update $(fmt_ms "$FS_CHECKOUT"))" \
        "git fetch + worktree add --detach: $(fmt_ms "$FS_GIT")" "$(ratio "$FS_HOOKCI" "$FS_GIT")" "$TARGET"
    TARGET="—"
    [ "$name" = large ] && TARGET="≤ 100 ms: $(verdict "$FS_OWN" "<=" 100)"
    row "reused: first step after the fetch, $files files (the run's to_first_step_ms - queue_ms - fetch_ms; median of $ROUNDS)" \
        "$(fmt_ms "$FS_OWN")" "—" "—" "$TARGET"
done
if [ "$REUSE" != 1 ]; then
    NOTES+=("Reused workspaces: hookci check refused a pipeline with \`workspace: reuse\` ($(head -1 "$WORK/reuse-check.out")), so those rows were not measured.")
fi

fi

# ===== 3. a step printing LOG_MB MB =======================================================
if has log; then
say "a step printing $LOG_MB MB, with and without a secret to mask"
LOG_BYTES=$(( LOG_MB * 1000 * 1000 ))
# The same command everywhere; the last line names the secret when the step has one,
# so the log shows whether masking happened.
LOG_CMD="yes 'hookci benchmark: one line of build output, about as long as a compiler line' | head -c $LOG_BYTES; echo \"end of output: \${BENCH_TOKEN:-no secret}\""
d="$WORK/log"
mkdir -p "$d/pipelines"
for kind in plain masked; do
    {
        echo "repo: bench/log-$kind"
        echo "clone_url: file://$WORK/src-small.git"
        echo "on: { branches: [main] }"
        [ "$kind" = masked ] && echo "secrets: [BENCH_TOKEN]"
        echo "steps:"
        echo "  - name: print"
        printf '    run: %s\n' "$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$LOG_CMD")"
    } >"$d/pipelines/log-$kind.yml"
done
EXTRA=("max_parallel_runs: 1")
# A per-run log cap, where hookci has one, must not cut this log short.
write_config "$d/probe.yml" "$d/pipelines" "$d/state" "max_parallel_runs: 1" "max_log_bytes: $(( 4 * LOG_BYTES ))"
if "$BIN" check -c "$d/probe.yml" >/dev/null 2>&1; then EXTRA+=("max_log_bytes: $(( 4 * LOG_BYTES ))"); fi
write_config "$d/hookci.yml" "$d/pipelines" "$d/state" "${EXTRA[@]}"
start_daemon "$d/hookci.yml" "$d/daemon.log" "HOOKCI_SECRET_BENCH_TOKEN=$BENCH_TOKEN"
: >"$d/plain.ms"; : >"$d/masked.ms"; : >"$d/shell.ms"
for ((r = 1; r <= LOG_ROUNDS; r++)); do
    take small
    for kind in plain masked; do
        out=$(push "bench/log-$kind" "file://$WORK/src-small.git" "$BEFORE" "$AFTER")
        run=$(kv run "$out")
        res=$(wait_run "$run" 600)
        echo "$kind: $res" >&2
        [ "$(kv status "$res")" = succeeded ] || die "the $kind log run $run did not succeed: $res"
        size=$(stat -c %s "$d/state/logs/$run/1.log")
        [ "$size" -ge "$LOG_BYTES" ] || NOTES+=("The $kind step's log of run $run holds $size bytes, less than the $LOG_BYTES printed.")
        last=$(tail -c 200 "$d/state/logs/$run/1.log")
        if [ "$kind" = masked ]; then
            case "$last" in *"$BENCH_TOKEN"*) die "the secret is in the log of run $run: masking failed" ;; esac
            case "$last" in *"end of output: no secret"*) die "the masked step did not get its secret" ;; esac
        fi
        kv step_ms "$res" >>"$d/$kind.ms"
        rm -rf "$d/state/logs/$run"
    done
    s0=$(now_ns)
    env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$WORK" LANG=C.UTF-8 BENCH_TOKEN="$BENCH_TOKEN" \
        sh -c "$LOG_CMD" >"$d/shell.log"
    s1=$(now_ns)
    awk -v a="$s0" -v b="$s1" 'BEGIN { print (b - a) / 1e6 }' >>"$d/shell.ms"
    rm -f "$d/shell.log"
    echo "round $r: plain $(tail -1 "$d/plain.ms") ms, masked $(tail -1 "$d/masked.ms") ms, shell $(tail -1 "$d/shell.ms") ms" >&2
done
stop_daemon
LOG_PLAIN=$(median <"$d/plain.ms"); LOG_MASKED=$(median <"$d/masked.ms"); LOG_SHELL=$(median <"$d/shell.ms")
row "a step printing $LOG_MB MB, no secret (median of $LOG_ROUNDS)" "$(fmt_ms "$LOG_PLAIN")" \
    "sh -c '… > file': $(fmt_ms "$LOG_SHELL")" "$(ratio "$LOG_PLAIN" "$LOG_SHELL")" \
    "≤ 1.10×: $(verdict "$(awk -v a="$LOG_PLAIN" -v b="$LOG_SHELL" 'BEGIN { print a / b }')" "<=" 1.1)"
row "a step printing $LOG_MB MB, one secret masked (median of $LOG_ROUNDS)" "$(fmt_ms "$LOG_MASKED")" \
    "sh -c '… > file': $(fmt_ms "$LOG_SHELL")" "$(ratio "$LOG_MASKED" "$LOG_SHELL")" \
    "≤ 1.30×: $(verdict "$(awk -v a="$LOG_MASKED" -v b="$LOG_SHELL" 'BEGIN { print a / b }')" "<=" 1.3)"

fi

# ===== 4. matching one push against PIPELINES pipelines ===================================
if has match; then
say "matching one push against 1 and $PIPELINES pipelines"
"$MATCH" 1 "$PIPELINES" | tee "$WORK/match.out" >&2
M1=$(kv us_per_push "$(grep ' pipelines=1 ' "$WORK/match.out")")
MN=$(kv us_per_push "$(grep " pipelines=$PIPELINES " "$WORK/match.out")")
MR=$(kv us_with_reasons "$(grep " pipelines=$PIPELINES " "$WORK/match.out")")
row "matching one push against $PIPELINES pipelines (matcher::decide)" "$MN µs (${MR:--} µs with every reason written out)" \
    "against 1 pipeline: $M1 µs" "$(ratio "$MN" "$M1")" \
    "≤ 1 ms: $(verdict "$MN" "<=" 1000)"

fi

# ===== 5. memory ======================================================================
if has memory; then
# Idle and under load come from the intake section (its busiest level); queued runs here.
if has intake; then
H=$(intake hookci "$LAST_LEVEL"); W=$(intake webhook "$LAST_LEVEL")
row "RSS idle (after start, before the load)" "$(fmt_mib "$(kv idle_kib "$H")")" \
    "webhook: $(fmt_mib "$(kv idle_kib "$W")")" "$(ratio "$(kv idle_kib "$H")" "$(kv idle_kib "$W")")" "—"
row "RSS under the intake load ($LAST_LEVEL conn., peak)" "$(fmt_mib "$(kv peak_kib "$H")")" \
    "webhook: $(fmt_mib "$(kv peak_kib "$W")")" "$(ratio "$(kv peak_kib "$H")" "$(kv peak_kib "$W")")" "—"
fi

say "RSS with $QUEUED queued runs"
d="$WORK/queue"
mkdir -p "$d/pipelines"
# The first run blocks in its step (until $WORK/release exists, or 10 minutes), so with
# max_parallel_runs 1 every later run stays queued; none supersedes another.
cat >"$d/pipelines/queue.yml" <<EOF
repo: bench/queue
clone_url: file://$WORK/src-small.git
on: { branches: [main] }
concurrency: { group: none, cancel: none }
env: { BENCH_RELEASE: "$WORK/release", BENCH_STARTED: "$d/started" }
steps:
  - name: block
    run: 'echo started >"\$BENCH_STARTED"; i=0; while [ ! -e "\$BENCH_RELEASE" ] && [ \$i -lt 6000 ]; do sleep 0.1; i=\$((i+1)); done'
EOF
write_config "$d/hookci.yml" "$d/pipelines" "$d/state" "max_parallel_runs: 1"
start_daemon "$d/hookci.yml" "$d/daemon.log"
take small
push bench/queue "file://$WORK/src-small.git" "$BEFORE" "$AFTER" >&2
wait_file "$d/started" 120
sleep 2
Q_ONE=$(rss_kib "$DPID" VmRSS)
T0=$(now_ns)
python3 "$CLIENT" flood "$URL/webhook" "$WORK/secret" bench/queue "file://$WORK/src-small.git" "$QUEUED" 8 \
    | tee "$d/flood.out" >&2
T1=$(now_ns)
sleep 2
Q_MANY=$(rss_kib "$DPID" VmRSS)
Q_HWM=$(rss_kib "$DPID" VmHWM)
QUEUED_NOW=$(python3 - "$d/state/hookci.db" <<'PY'
import sqlite3, sys
db = sqlite3.connect("file:%s?mode=ro" % sys.argv[1], uri=True)
print(db.execute("SELECT COUNT(*) FROM runs WHERE status = 'queued'").fetchone()[0])
PY
)
stop_daemon
: >"$WORK/release"
echo "queued runs in the store: $QUEUED_NOW; pushes took $(( (T1 - T0) / 1000000 )) ms; VmHWM $(fmt_mib "$Q_HWM")" >&2
[ "$QUEUED_NOW" -ge "$QUEUED" ] || NOTES+=("Only $QUEUED_NOW runs were queued when RSS was read, not $QUEUED.")
row "RSS with $QUEUED_NOW runs queued (1 running)" "$(fmt_mib "$Q_MANY")" \
    "the same daemon with 1 run: $(fmt_mib "$Q_ONE")" "$(ratio "$Q_MANY" "$Q_ONE")" "—"
fi

# ===== the table ========================================================================
ELAPSED=$(( $(date +%s) - STARTED ))
echo "hookci $REV, $(nproc) cores, load average before/after: $LOAD_BEFORE / $(cut -d' ' -f1-3 /proc/loadavg), $ELAPSED s in all"
echo
echo "| what | hookci | comparison | ratio | target |"
echo "|---|---|---|---|---|"
for r in "${ROWS[@]}"; do echo "$r"; done
for n in "${NOTES[@]}"; do echo; echo "$n"; done
