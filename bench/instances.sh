#!/usr/bin/env bash
# Benchmark of shared intake: acknowledged pushes per second with one and with two
# hookci instances on one PostgreSQL database. wrk POSTs distinct, signed push
# deliveries (bench/intake.lua, bench/gen_payloads.py) to each instance, the connections
# split evenly over the instances, then every delivery answered 202 is looked up in the
# database: each must be stored, with exactly one run. See bench/README.md.
#
# Knobs (environment): CONNS=16 (in all, over the instances)  DURATION=10s
#   PAYLOADS=200000  INSTANCES="1 2"  MAX_PARALLEL_RUNS=2
#   BIN=target/release/hookci  SKIP_BUILD=1 (use the existing BIN)
#   DATABASE_URL=postgres://user@host:port/db (a server whose user may create
#   databases; each level gets a new one. Unset: a throwaway cluster, as scripts/test
#   starts one, with fsync on)  KEEP=1 (keep the temp dir)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"
CONNS=${CONNS:-16}
DURATION=${DURATION:-10s}
PAYLOADS=${PAYLOADS:-200000}
INSTANCES=${INSTANCES:-"1 2"}
MAX_PARALLEL_RUNS=${MAX_PARALLEL_RUNS:-2}
BIN=${BIN:-"$ROOT/target/release/hookci"}

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'instances.sh: %s\n' "$*" >&2; exit 1; }

command -v wrk >/dev/null 2>&1 || { apt-get install -y wrk || { apt-get update && apt-get install -y wrk; }; }
command -v psql >/dev/null 2>&1 || die "psql is required (Debian's postgresql-client)"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    say "building hookci (release)"
    (cd "$ROOT" && cargo build --release --locked --bin hookci)
fi
[ -x "$BIN" ] || die "$BIN missing"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hookci-instances.XXXXXX")
# The database server runs as another user, under this directory.
chmod 711 "$WORK"
PIDS=()
PG_STOP=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    if [ "${#PG_STOP[@]}" -gt 0 ]; then "${PG_STOP[@]}" >/dev/null 2>&1 || true; fi
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the database server --------------------------------------------------------------
if [ -z "${DATABASE_URL:-}" ]; then
    bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -x "${bindir:-}/initdb" ] || die "no PostgreSQL server: install Debian's postgresql, or set DATABASE_URL"
    mkdir "$WORK/pg"
    prefix=()
    if [ "$(id -u)" = 0 ]; then
        # The server refuses to run as root.
        owner=nobody
        id postgres >/dev/null 2>&1 && owner=postgres
        chown "$owner" "$WORK/pg"
        prefix=(runuser -u "$owner" --)
    fi
    (cd "$WORK/pg" && "${prefix[@]}" "$bindir/initdb" -D "$WORK/pg/data" -U hookci -A trust -E UTF8 --locale=C) \
        >"$WORK/pg/initdb.log" 2>&1 || { cat "$WORK/pg/initdb.log" >&2; die "initdb failed"; }
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    # fsync stays on: acknowledged means committed to disk, as in production.
    (cd "$WORK/pg" && "${prefix[@]}" "$bindir/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $WORK/pg -c max_connections=200" start) >/dev/null \
        || { cat "$WORK/pg/server.log" >&2; die "the PostgreSQL cluster did not start"; }
    PG_STOP=("${prefix[@]}" "$bindir/pg_ctl" -D "$WORK/pg/data" -m fast stop)
    DATABASE_URL="postgres://hookci@127.0.0.1:$port/postgres"
fi
say "PostgreSQL $(psql "$DATABASE_URL" -Atc 'SHOW server_version')"

# --- fixtures -------------------------------------------------------------------------
python3 -c 'import secrets; print(secrets.token_hex(32))' >"$WORK/secret"
chmod 600 "$WORK/secret"
git init -q --bare "$WORK/bare.git"
mkdir "$WORK/pipelines"
# Runs fetch from a port nobody answers: intake is what is measured, not builds.
cat >"$WORK/pipelines/bench.yml" <<'YML'
repo: bench/repo
clone_url: http://127.0.0.1:9/bench/repo.git
on:
  branches: ["main"]
steps:
  - name: noop
    run: "true"
YML
say "generating $PAYLOADS signed push deliveries"
python3 "$BENCH/gen_payloads.py" "$PAYLOADS" "$WORK/secret" "$WORK/bare.git" "$WORK/payloads.tsv"

declare -A R_RPS R_ACK R_STORED R_RUNS R_OK
for N in $INSTANCES; do
    D="$WORK/n$N"
    mkdir -p "$D"
    db="bench_n${N}_$$"
    psql "$DATABASE_URL" -qc "CREATE DATABASE $db" >/dev/null
    URL="${DATABASE_URL%/*}/$db"
    # Distinct deliveries for each instance's wrk: line i goes to instance i mod N.
    for i in $(seq 0 $((N - 1))); do
        awk -v n="$N" -v i="$i" 'NR % n == i' "$WORK/payloads.tsv" >"$D/payloads-$i.tsv"
    done
    ADDRS=()
    PIDS=()
    for i in $(seq 0 $((N - 1))); do
        mkdir -p "$D/state-$i"
        cat >"$D/hookci-$i.yml" <<YML
listen: 127.0.0.1:0
pipelines: $WORK/pipelines
state_dir: $D/state-$i
database: $URL
webhook_secret_file: $WORK/secret
max_parallel_runs: $MAX_PARALLEL_RUNS
retention: { runs: 1000000000, days: 36500 }
YML
        "$BIN" serve -c "$D/hookci-$i.yml" 2>"$D/daemon-$i.log" &
        PIDS+=($!)
        addr=""
        for _ in $(seq 100); do
            addr=$(grep -m1 'listening' "$D/daemon-$i.log" 2>/dev/null | grep -o 'addr=[^ ]*' | cut -d= -f2 || true)
            [ -n "$addr" ] && break
            sleep 0.1
        done
        [ -n "$addr" ] || { cat "$D/daemon-$i.log" >&2; die "instance $i did not start"; }
        case "$addr" in 127.*) ;; *) die "refusing non-loopback $addr" ;; esac
        ADDRS+=("$addr")
    done
    sleep 1
    C=$(( CONNS / N ))
    T=$(( 2 / N < 1 ? 1 : 2 / N ))
    say "$N instance(s): ${ADDRS[*]}, $C connections and $T wrk thread(s) each, $DURATION"
    WRKS=()
    for i in $(seq 0 $((N - 1))); do
        env BENCH_DATA="$D/payloads-$i.tsv" BENCH_THREADS="$T" BENCH_ACK_FILE="$D/acked-$i.txt" \
            wrk -t"$T" -c"$C" -d"$DURATION" --timeout 10s --latency \
            -s "$BENCH/intake.lua" "http://${ADDRS[$i]}/webhook" >"$D/wrk-$i.txt" 2>&1 &
        WRKS+=($!)
    done
    for w in "${WRKS[@]}"; do wait "$w" || true; done
    # Killed, not stopped: only what PostgreSQL committed counts.
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    PIDS=()
    rps=0
    for i in $(seq 0 $((N - 1))); do
        line=$(grep '^BENCH ' "$D/wrk-$i.txt" || true)
        [ -n "$line" ] || { cat "$D/wrk-$i.txt" >&2; die "wrk against instance $i gave no summary"; }
        echo "instance $i: $line" >&2
        r=$(sed -n 's/.* rps=\([^ ]*\).*/\1/p' <<<"$line")
        rps=$(awk -v a="$rps" -v b="$r" 'BEGIN { print a + b }')
    done
    # Every 202 is a stored delivery with exactly one run.
    cat "$D"/acked-*.txt | sort -u >"$D/acked.txt"
    psql "$URL" -Atc "SELECT id FROM deliveries" | sort -u >"$D/stored.txt"
    missing=$(comm -23 "$D/acked.txt" "$D/stored.txt" | wc -l)
    without_one=$(comm -12 "$D/acked.txt" "$D/stored.txt" | psql "$URL" -Atc "
        CREATE TEMP TABLE acked (id TEXT PRIMARY KEY);
        COPY acked FROM STDIN;
        SELECT count(*) FROM acked a WHERE (SELECT count(*) FROM runs r WHERE r.delivery_id = a.id) <> 1;" | tail -1)
    R_RPS[$N]=$(awk -v r="$rps" 'BEGIN { printf "%.0f", r }')
    R_ACK[$N]=$(wc -l <"$D/acked.txt")
    R_STORED[$N]=$(wc -l <"$D/stored.txt")
    R_RUNS[$N]=$(psql "$URL" -Atc "SELECT count(*) FROM runs")
    if [ "$missing" = 0 ] && [ "$without_one" = 0 ]; then
        R_OK[$N]=yes
    else
        R_OK[$N]="NO: $missing missing, $without_one without exactly one run"
    fi
    grep -hE ' (ERROR|WARN) ' "$D"/daemon-*.log | head -5 >&2 || true
done

printf '\n| instances | connections | acknowledged pushes/s | acknowledged | stored | runs | every 202 stored, one run each |\n'
printf '|---|---|---|---|---|---|---|\n'
for N in $INSTANCES; do
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$N" "$CONNS" "${R_RPS[$N]}" "${R_ACK[$N]}" \
        "${R_STORED[$N]}" "${R_RUNS[$N]}" "${R_OK[$N]}"
done
