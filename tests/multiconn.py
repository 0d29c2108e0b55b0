#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Helper for test-write-multiconn.sh.

write URI SEED SPANS: write random spans over three connections (round
  robin), flush on the second, check every byte through the third, and
  save the spans.
verify RAW SPANS: the raw file holds the spans (the last one wins).
"""

import random
import sys


def expected(spans):
    """Each span with what later spans wrote over it."""
    for i, (off, data) in enumerate(spans):
        want = bytearray(data)
        for off2, data2 in spans[i + 1:]:
            a, b = max(off, off2), min(off + len(data), off2 + len(data2))
            if a < b:
                want[a - off:b - off] = data2[a - off2:b - off2]
        yield i, off, bytes(want)


def load(path):
    return [(int(a), bytes.fromhex(b)) for a, b in
            (line.split() for line in open(path))]


def write(uri, seed, path):
    import nbd
    rng = random.Random(seed)
    h = [nbd.NBD() for _ in range(3)]
    for x in h:
        x.connect_uri(uri)
        assert x.can_multi_conn(), "multi-conn is not advertised"
    size = h[0].get_size()
    spans = []
    for i in range(24):
        data = rng.randbytes(rng.randint(1, 300000))
        off = rng.randrange(0, size - len(data))
        h[i % 3].pwrite(data, off)
        spans.append((off, data))
    h[1].flush()
    for i, off, want in expected(spans):
        assert h[2].pread(len(want), off) == want, \
            f"span {i} at {off}: a third connection does not see it"
    with open(path, "w") as f:
        for off, data in spans:
            f.write(f"{off} {data.hex()}\n")
    print(f"{len(spans)} spans written on 3 connections, flushed on one, "
          f"seen on another")


def verify(raw, path):
    with open(raw, "rb") as f:
        for i, off, want in expected(load(path)):
            f.seek(off)
            assert f.read(len(want)) == want, \
                f"span {i} at {off} was lost after kill -9 following a flush"
    print("every flushed span survived kill -9")


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        verify(sys.argv[2], sys.argv[3])
