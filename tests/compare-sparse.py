# nbdkit-qcow2 test helper: compare two NBD exports without reading
# every byte of big sparse disks.
# SPDX-License-Identifier: BSD-3-Clause
#
# usage: python3 compare-sparse.py EXPECTED_URI GOT_URI SEED
#
# EXPECTED_URI is qemu-nbd serving the image (the reference); GOT_URI
# is the plugin.  Every range that qemu does not report as a hole is
# read from both and compared in full.  In ranges qemu reports as
# holes, seeded random spots are compared (and must be zero), plus
# both edges of every hole.  Exits 1 on the first difference.

import random
import sys

import nbd

CHUNK = 4 * 1024 * 1024


def connect(uri):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def extents(h, size):
    """Yield (offset, length, flags) for the whole export."""
    off = 0
    while off < size:
        got = []

        def cb(metacontext, offset, entries, err):
            if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
                got.extend(entries)
            return 0

        h.block_status(min(size - off, 2 ** 31), off, cb)
        if not got:
            sys.exit("no extents returned at offset %d" % off)
        for i in range(0, len(got), 2):
            length, flags = got[i], got[i + 1]
            length = min(length, size - off)
            yield off, length, flags
            off += length
            if off >= size:
                break


def main():
    exp = connect(sys.argv[1])
    got = connect(sys.argv[2])
    rng = random.Random(int(sys.argv[3]))
    size = exp.get_size()
    if got.get_size() != size:
        sys.exit("size %d, expected %d" % (got.get_size(), size))

    data_bytes = 0
    spots = 0

    def check(off, length):
        a = exp.pread(length, off)
        b = got.pread(length, off)
        if a != b:
            i = next(j for j in range(length) if a[j] != b[j])
            sys.exit("first difference at guest offset %d (0x%x): "
                     "expected %s, got %s" %
                     (off + i, off + i, a[i:i + 16].hex(), b[i:i + 16].hex()))
        return a

    for off, length, flags in list(extents(exp, size)):
        if not flags & 1:
            # Data according to qemu: compare all of it.
            pos = off
            while pos < off + length:
                n = min(CHUNK, off + length - pos)
                check(pos, n)
                pos += n
            data_bytes += length
        else:
            # Hole: edges and seeded spots.
            n = min(length, 4096)
            for p in {off, off + length - n}:
                if check(p, n) != bytes(n):
                    sys.exit("qemu hole at %d not zero?" % p)
            for _ in range(16):
                p = off + rng.randrange(length)
                n = min(4096, off + length - p)
                check(p, n)
            spots += 1

    if data_bytes == 0:
        sys.exit("sanity: qemu reports no data at all; comparison is empty")
    print("compared %d data bytes in full and %d holes by sampling"
          % (data_bytes, spots))


main()
