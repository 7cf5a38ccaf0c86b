#!/usr/bin/env python3
"""A git fast-import stream for bench/run.sh: a repository of FILES files on `main`, then
CHANGES more commits that each change one file (the push a developer makes all day).

Usage: gen_repo.py FILES CHANGES | git -C REPO.git fast-import --export-marks=MARKS

Commit marks are :1 (all files) and :2 .. :CHANGES+1 (one changed file each). Files lie
in two levels of directories, 20 to a directory, 200 bytes to 16 KiB of source-like
text each (about 8 KiB on average, a source tree like git's own). Deterministic. Stdlib
only.
"""

import random
import sys

WORDS = (
    "static int struct const char return if else for while size_t unsigned void "
    "buffer length index error result value commit tree object path config"
).split()


def path_of(i: int) -> str:
    return "src/d%02d/s%02d/file_%05d.c" % (i // 400, (i // 20) % 20, i)


def content(i: int, rng: random.Random) -> bytes:
    size = rng.randint(200, 16 * 1024)
    lines, n = [], 0
    while n < size:
        line = "%s %s_%d(%s);\n" % (
            rng.choice(WORDS),
            rng.choice(WORDS),
            rng.randint(0, 9999),
            ", ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5))),
        )
        lines.append(line)
        n += len(line)
    return ("/* file %d */\n" % i + "".join(lines)).encode()


def blob(out, data: bytes) -> None:
    out.write(b"data %d\n" % len(data))
    out.write(data)
    out.write(b"\n")


def commit(out, mark: int, when: int, message: str, parent: bool) -> None:
    out.write(b"commit refs/heads/main\nmark :%d\n" % mark)
    out.write(b"author hookci bench <bench@hookci.invalid> %d +0000\n" % when)
    out.write(b"committer hookci bench <bench@hookci.invalid> %d +0000\n" % when)
    blob(out, message.encode())
    if parent:
        out.write(b"from :%d\n" % (mark - 1))


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[3], file=sys.stderr)
        return 2
    files, changes = int(sys.argv[1]), int(sys.argv[2])
    out = sys.stdout.buffer
    rng = random.Random(14)
    when = 1_700_000_000
    commit(out, 1, when, "%d files" % files, parent=False)
    out.write(b"M 100644 inline README\n")
    blob(out, b"hookci benchmark repository\n")
    for i in range(files - 1):
        out.write(b"M 100644 inline %s\n" % path_of(i).encode())
        blob(out, content(i, rng))
    for c in range(changes):
        i = (c * 37 + 11) % max(files - 1, 1)
        commit(out, c + 2, when + c + 1, "change %d: %s" % (c + 1, path_of(i)), parent=True)
        out.write(b"M 100644 inline %s\n" % path_of(i).encode())
        blob(out, content(i, rng) + b"/* change %d */\n" % (c + 1))
    out.write(b"done\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
