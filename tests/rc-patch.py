#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Refcount surgery for the repair tests, written from the qcow2 spec.

get-rc IMG CLUSTER            print the refcount of a host cluster
set-rc IMG CLUSTER VALUE      set it (the cluster's refcount block must exist)
set-reftable IMG INDEX VALUE  overwrite refcount table entry INDEX
host IMG GUEST_OFFSET         print the host offset of a guest cluster
                              (0 if unallocated; COPIED flag stripped)
"""

import struct
import sys


def header(f):
    f.seek(0)
    h = f.read(104)
    version = struct.unpack(">I", h[4:8])[0]
    return {
        "cluster_bits": struct.unpack(">I", h[20:24])[0],
        "l1_offset": struct.unpack(">Q", h[40:48])[0],
        "reftable_offset": struct.unpack(">Q", h[48:56])[0],
        "incompat": struct.unpack(">Q", h[72:80])[0] if version >= 3 else 0,
        "order": struct.unpack(">I", h[96:100])[0] if version >= 3 else 4,
    }


def rc_location(f, h, cluster):
    cs = 1 << h["cluster_bits"]
    bits = 1 << h["order"]
    per = cs * 8 // bits
    f.seek(h["reftable_offset"] + 8 * (cluster // per))
    block = struct.unpack(">Q", f.read(8))[0] & ~511
    assert block, "no refcount block for that cluster"
    return block, (cluster % per) * bits, bits


def get_rc(f, h, cluster):
    block, bit, bits = rc_location(f, h, cluster)
    assert bits >= 8, "only refcount widths of 8 bits or more"
    f.seek(block + bit // 8)
    return int.from_bytes(f.read(bits // 8), "big")


def set_rc(f, h, cluster, value):
    block, bit, bits = rc_location(f, h, cluster)
    assert bits >= 8, "only refcount widths of 8 bits or more"
    f.seek(block + bit // 8)
    f.write(value.to_bytes(bits // 8, "big"))


def host(f, h, guest):
    cb = h["cluster_bits"]
    esize = 16 if h["incompat"] & 16 else 8
    per_l2 = (1 << cb) // esize
    gc = guest >> cb
    f.seek(h["l1_offset"] + 8 * (gc // per_l2))
    l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
    if not l2:
        return 0
    f.seek(l2 + esize * (gc % per_l2))
    return struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00


def main():
    cmd, img = sys.argv[1], sys.argv[2]
    with open(img, "r+b") as f:
        h = header(f)
        if cmd == "get-rc":
            print(get_rc(f, h, int(sys.argv[3])))
        elif cmd == "set-rc":
            set_rc(f, h, int(sys.argv[3]), int(sys.argv[4]))
        elif cmd == "set-reftable":
            f.seek(h["reftable_offset"] + 8 * int(sys.argv[3]))
            f.write(struct.pack(">Q", int(sys.argv[4])))
        elif cmd == "host":
            print(host(f, h, int(sys.argv[3])))
        else:
            sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main()
