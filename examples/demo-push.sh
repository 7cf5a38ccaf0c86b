#!/usr/bin/env bash
# Makes a commit in a local demo repository and sends hookci the push GitHub would
# send for it, signed with the same secret the daemon uses.
#   usage: examples/demo-push.sh [URL]      (default http://127.0.0.1:8080/webhook)
set -euo pipefail
url=${1:-http://127.0.0.1:8080/webhook}
: "${HOOKCI_WEBHOOK_SECRET:?set HOOKCI_WEBHOOK_SECRET to the secret of the daemon}"
root=$(cd "$(dirname "$0")/.." && pwd)
demo=${HOOKCI_DEMO_DIR:-/tmp/hookci-demo}
hookci=${HOOKCI_BIN:-$root/target/release/hookci}

# Made anew unless both halves are there (a clone without its remote cannot push).
if [ ! -d "$demo/work/.git" ] || [ ! -d "$demo/hello.git" ]; then
  rm -rf "$demo/work" "$demo/hello.git"
  mkdir -p "$demo"
  git init -q --bare "$demo/hello.git"
  git init -q -b main "$demo/work"
  git -C "$demo/work" remote add origin "$demo/hello.git"
  printf '#!/bin/sh\necho "building $(basename "$PWD") at $(git rev-parse --short HEAD)"\n' > "$demo/work/build.sh"
fi
before=$(git -C "$demo/work" rev-parse -q --verify HEAD || echo 0000000000000000000000000000000000000000)
date > "$demo/work/stamp.txt"
git -C "$demo/work" add -A
git -C "$demo/work" -c user.name=demo -c user.email=demo@example.invalid commit -q -m "demo change"
git -C "$demo/work" push -q origin main
after=$(git -C "$demo/work" rev-parse HEAD)

cat > "$demo/push.json" <<JSON
{"ref":"refs/heads/main","before":"$before","after":"$after","created":false,"deleted":false,"forced":false,"head_commit":{"id":"$after","message":"demo change"},"repository":{"full_name":"hookci-demo/hello","clone_url":"$demo/hello.git","default_branch":"main"}}
JSON
"$hookci" send "$demo/push.json" --url "$url" --event push
