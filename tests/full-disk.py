#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Helper of test-full-disk.sh: writes through NBD until the disk is
full, and checks what was acknowledged and flushed.

usage:
  full-disk.py fill URI STATE SEED     write until ENOSPC; STATE gets the
                                       flushed writes (JSON)
  full-disk.py verify-nbd URI STATE    every flushed write reads back
  full-disk.py more URI STATE SEED N   N more writes after the end, flushed
  full-disk.py verify-raw RAW STATE    the same against a raw file
"""

import json
import random
import sys

MiB = 1 << 20


def data_for(seed, i, length):
    return random.Random(seed * 1000003 + i).randbytes(length)


def load(path):
    with open(path) as f:
        return json.load(f)


def save(path, state):
    with open(path, "w") as f:
        json.dump(state, f)


# nbd.Error.errno is the errno's name, such as "ENOSPC".

def connect(uri):
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    return nbd, h


def fill(uri, path, seed):
    nbd, h = connect(uri)
    size = h.get_size()
    rng = random.Random(seed)
    flushed, pending = [], []
    off, i, err = 0, 0, None
    while True:
        length = rng.randint(64 * 1024, MiB)
        off += rng.choice([0, 0, rng.randrange(1, 4096)])   # some unaligned
        if off + length > size:
            sys.exit("the disk never filled up: %d bytes written" % off)
        try:
            h.pwrite(data_for(seed, i, length), off)
            pending.append([off, length, seed, i])
            off += length
            i += 1
            if i % 4 == 0:
                h.flush()
                flushed += pending
                pending = []
        except nbd.Error as e:
            err = e
            break
    print("write %d (offset %d) failed after %d flushed writes (%d MiB): %s"
          % (i, off, len(flushed), off // MiB, err))
    if err.errno != "ENOSPC":
        sys.exit("expected ENOSPC, got errno %s" % err.errno)

    # The server still answers, and what was flushed reads back.
    verify_handle(h, flushed)
    # Overwriting data already allocated needs no space.
    o, n, s, k = flushed[0]
    h.pwrite(data_for(s, k + 100000, n), o)
    flushed[0] = [o, n, s, k + 100000]
    try:
        h.flush()
        print("a flush after the failure succeeded")
    except nbd.Error as e:
        print("a flush after the failure failed: %s" % e)
        if e.errno != "ENOSPC":
            sys.exit("expected ENOSPC from the flush, got errno %s" % e.errno)
        flushed[0] = [o, n, None, None]     # either content is fine
    # A new allocation still fails cleanly.
    try:
        h.pwrite(data_for(seed, i, MiB), off)
        h.flush()
        print("a write after the failure succeeded (space was freed)")
        flushed.append([off, MiB, seed, i])
        off += MiB
        i += 1
    except nbd.Error as e:
        print("a new write after the failure failed again: %s" % e)
        if e.errno != "ENOSPC":
            sys.exit("expected ENOSPC again, got errno %s" % e.errno)
    verify_handle(h, flushed)
    h.shutdown()
    save(path, {"flushed": flushed, "end": off, "next": i})


def check(got, rec, where):
    o, n, s, k = rec
    if s is None:
        return
    if got != data_for(s, k, n):
        sys.exit("%s: the flushed write at %d+%d reads back wrong"
                 % (where, o, n))


def verify_handle(h, flushed):
    for rec in flushed:
        check(h.pread(rec[1], rec[0]), rec, "over NBD")
    print("%d flushed writes read back over NBD" % len(flushed))


def verify_nbd(uri, path):
    nbd, h = connect(uri)
    verify_handle(h, load(path)["flushed"])
    h.shutdown()


def more(uri, path, seed, count):
    nbd, h = connect(uri)
    state = load(path)
    off, i = state["end"], state["next"]
    for _ in range(count):
        h.pwrite(data_for(seed, i, MiB), off)
        state["flushed"].append([off, MiB, seed, i])
        off += MiB
        i += 1
    h.flush()
    state["end"], state["next"] = off, i
    print("%d more writes and a flush succeeded" % count)
    verify_handle(h, state["flushed"])
    h.shutdown()
    save(path, state)


def verify_raw(raw, path):
    flushed = load(path)["flushed"]
    with open(raw, "rb") as f:
        for rec in flushed:
            f.seek(rec[0])
            check(f.read(rec[1]), rec, "through qemu-img convert")
    print("%d flushed writes read back through qemu" % len(flushed))


def main():
    cmd = sys.argv[1]
    if cmd == "fill":
        fill(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif cmd == "verify-nbd":
        verify_nbd(sys.argv[2], sys.argv[3])
    elif cmd == "more":
        more(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif cmd == "verify-raw":
        verify_raw(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
