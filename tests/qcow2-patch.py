#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Small qcow2 surgery for tests, written from the spec.

info IMG                      print header fields and where things are
set-l2 IMG GUEST_CLUSTER HOST point the L2 entry of a guest cluster at HOST
                              (with the COPIED flag)
set-incompat IMG BITS         OR BITS into incompatible_features
get IMG OFFSET LEN            print LEN bytes at OFFSET as hex
set-autoclear IMG BITS        OR BITS into autoclear_features
add-ext IMG MAGIC HEX         add a header extension before the end mark
exts IMG                      print each header extension's magic and data
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


def extensions(f):
    """(offset, magic, data) of each header extension, and the end mark's
    offset."""
    f.seek(100)
    off = struct.unpack(">I", f.read(4))[0]
    out = []
    while True:
        f.seek(off)
        magic, length = struct.unpack(">II", f.read(8))
        if magic == 0:
            return out, off
        out.append((off, magic, f.read(length)))
        off += 8 + (length + 7) // 8 * 8


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
        elif cmd == "set-autoclear":
            f.seek(88)
            v = struct.unpack(">Q", f.read(8))[0]
            f.seek(88)
            f.write(struct.pack(">Q", v | int(sys.argv[3])))
        elif cmd == "add-ext":
            _, end = extensions(f)
            data = bytes.fromhex(sys.argv[4])
            pad = (len(data) + 7) // 8 * 8 - len(data)
            f.seek(end)
            f.write(struct.pack(">II", int(sys.argv[3], 0), len(data)) +
                    data + bytes(pad) + bytes(8))
        elif cmd == "exts":
            for _, magic, data in extensions(f)[0]:
                print(f"0x{magic:08x} {data.hex()}")
        elif cmd == "get":
            f.seek(int(sys.argv[3]))
            print(f.read(int(sys.argv[4])).hex())


if __name__ == "__main__":
    main()
