#!/usr/bin/env python3
"""Precompute signed, distinct GitHub push deliveries for bench/intake.lua.

Usage: gen_payloads.py COUNT SECRET_FILE CLONE_URL OUT_FILE

Writes one delivery per line: "<X-GitHub-Delivery>\t<X-Hub-Signature-256>\t<body>".
Every line has its own delivery id and its own commit (`after` == `head_commit.id`),
so no request is a duplicate of another. The body is compact JSON (no tabs, no
newlines) and the signature is HMAC-SHA256(secret, exact body bytes). Stdlib only.
Deterministic: the same COUNT and secret give the same file.
"""

import hashlib
import hmac
import json
import sys
import uuid


def main() -> int:
    if len(sys.argv) != 5:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    count = int(sys.argv[1])
    with open(sys.argv[2], "rb") as f:
        secret = f.read().strip()
    clone_url = sys.argv[3]
    out = sys.argv[4]
    if not secret:
        print("gen_payloads.py: empty secret", file=sys.stderr)
        return 2

    def sha(i: int) -> str:
        return hashlib.sha1(b"hookci-bench-commit-%d" % i).hexdigest()

    with open(out, "w", encoding="ascii", newline="\n") as f:
        for i in range(count):
            after = sha(i)
            body = json.dumps(
                {
                    "ref": "refs/heads/main",
                    "before": sha(i - 1),
                    "after": after,
                    "created": False,
                    "deleted": False,
                    "forced": False,
                    "head_commit": {"id": after, "message": "bench %d" % i},
                    "repository": {"full_name": "bench/repo", "clone_url": clone_url},
                },
                separators=(",", ":"),
            ).encode()
            assert b"\t" not in body and b"\n" not in body
            sig = hmac.new(secret, body, hashlib.sha256).hexdigest()
            delivery = str(uuid.UUID(hashlib.md5(b"hookci-bench-delivery-%d" % i).hexdigest()))
            f.write("%s\tsha256=%s\t%s\n" % (delivery, sig, body.decode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
