#!/usr/bin/env bash
# Remakes docs/dashboard-run.png: starts a real hookci on loopback with a demo
# pipeline, runs it once, and takes a screenshot of the run's page with headless
# Chromium. Run by hand; needs git, curl, chromium and a Rust toolchain.
#   bash bench/screenshot.sh                 # debug build
#   HOOKCI=target/release/hookci bash bench/screenshot.sh
#   OUT=/tmp/x.png SIZE=390,844 bash bench/screenshot.sh   # a phone-sized one
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-docs/dashboard-run.png}
size=${SIZE:-1100,900}
if [ -z "${HOOKCI:-}" ]; then
  cargo build --locked -q
  HOOKCI=target/debug/hookci
fi
command -v chromium >/dev/null || { echo "needs chromium (apt-get install chromium)" >&2; exit 1; }

tmp=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

git init -q -b main "$tmp/repo"
printf 'fn main() {}\n' > "$tmp/repo/main.rs"
git -C "$tmp/repo" add main.rs
git -C "$tmp/repo" -c user.name=demo -c user.email=demo@example.invalid \
  commit -q -m "Teach the parser about nested groups"

mkdir "$tmp/pipelines"
cat > "$tmp/pipelines/demo.yml" <<YAML
repo: octo-org/demo
clone_url: $tmp/repo
on:
  branches: [main]
steps:
  - name: build
    run: |
      printf '\033[1;32m   Compiling\033[0m demo v0.1.0\n'
      sleep 0.3
      printf '\033[1;32m    Finished\033[0m dev profile in 1.21s\n'
  - name: test
    run: |
      printf 'running 4 tests\n'
      for t in parser::groups parser::nested lexer::spans lexer::unicode; do
        printf 'test %s ... \033[32mok\033[0m\n' "\$t"; sleep 0.2
      done
      printf '\ntest result: \033[32mok\033[0m. 4 passed; 0 failed\n'
  - name: lint
    run: |
      printf '\033[33mwarning\033[0m: unused variable: \033[1mcount\033[0m\n'
      printf '  --> src/parser.rs:42:9\n'
YAML
printf 'demo-secret\n' > "$tmp/secret"
printf 'demo-token\n' > "$tmp/token"
cat > "$tmp/hookci.yml" <<YAML
listen: 127.0.0.1:0
pipelines: $tmp/pipelines
state_dir: $tmp/state
webhook_secret_file: $tmp/secret
api_token_file: $tmp/token
reconcile_interval: 0
YAML

"$HOOKCI" serve -c "$tmp/hookci.yml" 2> "$tmp/log" &
pid=$!
addr=
for _ in $(seq 100); do
  # One sed, no pipe: with pipefail, a `| head -1` that closes early fails the loop.
  addr=$(sed -n '/ listening.*addr=/{s/.*addr=\([^ ]*\).*/\1/p;q}' "$tmp/log")
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { cat "$tmp/log" >&2; exit 1; }

curl -fsS -X POST -H 'Authorization: Bearer demo-token' -d '{"ref": "main"}' \
  "http://$addr/api/pipelines/demo/trigger" > /dev/null
# The run's JSON is read whole and then matched: `curl | grep -q` under pipefail
# fails whenever grep, done at the first match, closes the pipe before curl ends.
# The list has the one run without its steps, so its only "status" is the run's.
status=
for _ in $(seq 300); do
  run=$(curl -fsS "http://$addr/api/runs?limit=1" || true)
  status=$(printf '%s' "$run" | sed -n 's/.*"status":"\([a-z_]*\)".*/\1/p')
  case $status in
    succeeded) break ;;
    failed|timed_out|canceled|skipped|interrupted)
      echo "the demo run ended $status: $run" >&2; exit 1 ;;
  esac
  sleep 0.1
done
[ "$status" = succeeded ] || { echo "the demo run did not finish: ${run:-no answer}" >&2; exit 1; }

chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$tmp/profile" --hide-scrollbars --window-size="$size" \
  --screenshot="$out" "http://$addr/runs/1" 2> /dev/null
echo "wrote $out"
