#!/usr/bin/env bash
# Dashboard page answer times with many runs in the store (default 10,000): fills a
# fresh store (examples/fill-runs), starts hookci on loopback, and times each page
# with curl: median and slowest of ROUNDS requests. Run by hand; not a test.
#   bash bench/pages.sh
#   RUNS=10000 ROUNDS=50 PROFILE=release bash bench/pages.sh
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-10000}
rounds=${ROUNDS:-30}
profile=${PROFILE:-debug}
flag=$([ "$profile" = release ] && echo --release || true)
cargo build --locked -q $flag --bin hookci --example fill-runs
bin=target/$profile

tmp=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

mkdir "$tmp/pipelines"
for p in build deploy docs; do
  printf 'repo: octo-org/octo-repo\nsteps:\n  - name: build\n    run: "true"\n  - name: test\n    run: "true"\n' \
    > "$tmp/pipelines/$p.yml"
done
start=$(date +%s)
"$bin/examples/fill-runs" "$tmp/state" "$runs"
echo "filled in $(( $(date +%s) - start )) s"
printf 'bench-secret\n' > "$tmp/secret"
cat > "$tmp/hookci.yml" <<YAML
listen: 127.0.0.1:0
pipelines: $tmp/pipelines
state_dir: $tmp/state
webhook_secret_file: $tmp/secret
reconcile_interval: 0
retention: { runs: 1000000, days: 36500, interval: 0 }
YAML
"$bin/hookci" serve -c "$tmp/hookci.yml" 2> "$tmp/log" &
pid=$!
addr=
for _ in $(seq 100); do
  # One sed, no pipe: with pipefail, a `| head -1` that closes early fails the loop.
  addr=$(sed -n '/ listening.*addr=/{s/.*addr=\([^ ]*\).*/\1/p;q}' "$tmp/log")
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { cat "$tmp/log" >&2; exit 1; }

mid=$(( runs / 2 ))
delivery=bench-$(( runs / 20 ))
printf '%-40s %10s %10s\n' page median slowest
for path in / "/?status=failed" "/?pipeline=docs&status=failed" "/?before=$mid" \
  "/runs/$mid" /pipelines /pipelines/build "/pipelines/docs?before=$mid" \
  "/deliveries/$delivery" /badge/build.svg "/badge/deploy.svg?ref=release/1.2" \
  "/api/runs" "/api/deliveries/$delivery"; do
  for _ in $(seq "$rounds"); do
    curl -s -o /dev/null -w '%{http_code} %{time_total}\n' "http://$addr$path"
  done | sort -k2 -n | awk -v p="$path" '
    $1 != 200 { bad = 1 }
    { t[NR] = $2 * 1000 }
    END {
      if (bad) { print p ": not 200" > "/dev/stderr"; exit 1 }
      printf "%-40s %8.1f ms %8.1f ms\n", p, t[int((NR + 1) / 2)], t[NR]
    }'
done
