#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Small qcow2 surgery for tests, written from the spec.

info IMG                      print header fields and where things are
set-l2 IMG GUEST_CLUSTER HOST point the L2 entry of a guest cluster at HOST
                              (with the COPIED flag)
set-incompat IMG BITS         OR BITS into incompatible_features
get IMG OFFSET LEN            print LEN bytes at OFFSET as hex
"""

import struct
import sys


def header(f):
    f.seek(0)
    h = f.read(112)
    return {
        "cluster_bits": struct.unpack(">I", h[20:24])[0],
        "l1_offset": struct.unpack(">Q", h[40:48])[0],
        "reftable_offset": struct.unpack(">Q", h[48:56])[0],
        "incompat": struct.unpack(">Q", h[72:80])[0],
    }


def l2_entry_offset(f, h, guest_cluster):
    cb = h["cluster_bits"]
    per_l2 = 1 << (cb - 3)
    f.seek(h["l1_offset"] + 8 * (guest_cluster // per_l2))
    l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
    assert l2, "no L2 table for that guest cluster"
    return l2 + 8 * (guest_cluster % per_l2)


def main():
    cmd, img = sys.argv[1], sys.argv[2]
    with open(img, "r+b") as f:
        h = header(f)
        if cmd == "info":
            f.seek(h["reftable_offset"])
            h["refblock0"] = struct.unpack(">Q", f.read(8))[0]
            for k, v in h.items():
                print(f"{k}={v}")
        elif cmd == "set-l2":
            off = l2_entry_offset(f, h, int(sys.argv[3]))
            f.seek(off)
            f.write(struct.pack(">Q", int(sys.argv[4]) | (1 << 63)))
        elif cmd == "set-incompat":
            f.seek(72)
            f.write(struct.pack(">Q", h["incompat"] | int(sys.argv[3])))
        elif cmd == "get":
            f.seek(int(sys.argv[3]))
            print(f.read(int(sys.argv[4])).hex())


if __name__ == "__main__":
    main()
