#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
# Make a mixed raw disk for the compressed-write tests:
#   compress-disk.py OUT SIZE UNIT SEED
# The disk is cut into UNIT-sized pieces, each one of: word-like text
# (compressible), random bytes (incompressible), zeros written out, or
# a hole.  The last piece may be short.  Prints the byte counts of each
# kind, as "text=N random=N zeros=N hole=N".
import random
import sys

out, size, unit, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4])
rng = random.Random(seed)
words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz")
               for _ in range(rng.randint(2, 9))) for _ in range(300)]
counts = {"text": 0, "random": 0, "zeros": 0, "hole": 0}
kinds = ["text", "random", "zeros", "hole", "text"]


def text(n):
    parts, got = [], 0
    while got < n:
        w = rng.choice(words) + rng.choice([b" ", b" ", b" ", b"\n", b", "])
        parts.append(w)
        got += len(w)
    return b"".join(parts)[:n]


with open(out, "wb") as f:
    off = 0
    i = 0
    while off < size:
        n = min(unit, size - off)
        kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
        f.seek(off)
        if kind == "text":
            f.write(text(n))
        elif kind == "random":
            f.write(rng.randbytes(n))
        elif kind == "zeros":
            f.write(bytes(n))
        counts[kind] += n
        off += n
        i += 1
    f.truncate(size)
print(" ".join(f"{k}={v}" for k, v in counts.items()))
