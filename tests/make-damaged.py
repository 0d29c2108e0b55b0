#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Make damaged qcow2 images from good ones, for tests/test-damaged.sh.

Usage: make-damaged.py SRCDIR OUTDIR > MANIFEST
       make-damaged.py --metadata-clean IMAGE BYTE

The second form checks, after a client wrote runs of BYTE to a damaged
image, that no metadata cluster (header, L1 and L2 tables, refcount
table and blocks, snapshot table and snapshot L1 tables) holds a run
of 64 such bytes: guest data must never land in metadata, whatever the
damaged entries say.

SRCDIR holds images made by qemu-img/qemu-io (see test-damaged.sh):
  v2.qcow2, v3.qcow2   4 KiB clusters, 8 MiB, data at 0 and 4 MiB (64 KiB each)
  comp.qcow2           the same data, compressed, 4 KiB clusters
  snap.qcow2           v3 with snapshot "s1", then 0..4 KiB rewritten
  overlay.qcow2        v3 over backing file base.qcow2 (format recorded)
  extl2.qcow2          extended L2, 16 KiB clusters, data at 0 and 4 MiB

Every field is located by parsing the image, never by a fixed offset,
so the damage lands where it is meant to whatever qemu-img's layout.

Each manifest line is tab-separated:
  NAME  KIND  OFFSET  LENGTH  GOOD  PATTERN  ARGS
KIND is what the plugin must do:
  open     refuse to serve the image (nbdkit fails, message names the file)
  read     serve it; reading LENGTH bytes at OFFSET fails, a read at GOOD
           on the same connection still works
  nocrash  anything but a crash or a hang (for damage that a reader
           need not detect, e.g. an L2 entry pointing into metadata)
PATTERN is an extended regexp the error log must also match ("-": none);
ARGS are extra plugin parameters ("-": none).
"""

import os
import struct
import sys

MAGIC = 0x514649FB
COPIED = 1 << 63
COMPRESSED = 1 << 62
OFFSET_MASK = 0x00FFFFFFFFFFFE00

manifest = []


class Image:
    def __init__(self, name):
        with open(os.path.join(src, name), "rb") as f:
            self.b = bytearray(f.read())
        self.base = name
        assert self.u32(0) == MAGIC, name
        self.version = self.u32(4)
        self.cb = self.u32(20)
        self.cs = 1 << self.cb
        self.size = self.u64(24)
        self.l1_size = self.u32(36)
        self.l1_offset = self.u64(40)
        self.reftable_offset = self.u64(48)
        self.reftable_clusters = self.u32(56)
        self.nb_snapshots = self.u32(60)
        self.snapshots_offset = self.u64(64)
        if self.version >= 3:
            self.incompat = self.u64(72)
            self.header_length = self.u32(100)
        else:
            self.incompat = 0
            self.header_length = 72
        self.extl2 = bool(self.incompat & (1 << 4))
        self.l2e = 16 if self.extl2 else 8
        self.l2_bits = self.cb - (4 if self.extl2 else 3)

    # Big-endian field access.
    def u16(self, off):
        return struct.unpack_from(">H", self.b, off)[0]

    def u32(self, off):
        return struct.unpack_from(">I", self.b, off)[0]

    def u64(self, off):
        return struct.unpack_from(">Q", self.b, off)[0]

    def set16(self, off, v):
        struct.pack_into(">H", self.b, off, v & 0xFFFF)

    def set32(self, off, v):
        struct.pack_into(">I", self.b, off, v & 0xFFFFFFFF)

    def set64(self, off, v):
        struct.pack_into(">Q", self.b, off, v & 0xFFFFFFFFFFFFFFFF)

    @property
    def file_end_cluster(self):
        """First cluster-aligned offset at or after EOF."""
        return (len(self.b) + self.cs - 1) // self.cs * self.cs

    def l1_entry(self, guest, l1_offset=None):
        """File offset of the L1 entry for guest offset."""
        base = self.l1_offset if l1_offset is None else l1_offset
        return base + (guest >> (self.cb + self.l2_bits)) * 8

    def l2_entry(self, guest, l1_offset=None):
        """File offset of the L2 entry for guest offset (must exist)."""
        l2 = self.u64(self.l1_entry(guest, l1_offset)) & OFFSET_MASK
        assert l2 != 0, "%s: no L2 table for guest offset %d" % (
            self.base, guest)
        idx = (guest >> self.cb) & ((1 << self.l2_bits) - 1)
        return l2 + idx * self.l2e

    def extensions(self):
        """(offset, magic, length) of each header extension."""
        off = self.header_length
        end = self.cs
        if self.u64(8):
            end = self.u64(8)
        while off + 8 <= end:
            magic, length = struct.unpack_from(">II", self.b, off)
            if magic == 0:
                return
            yield off, magic, length
            off += 8 + (length + 7) // 8 * 8

    def save(self, name, kind, offset=0, length=512, good=0, pattern="-",
             args="-"):
        fname = name + ".qcow2"
        with open(os.path.join(out, fname), "wb") as f:
            f.write(self.b)
        manifest.append("\t".join(str(x) for x in (
            fname, kind, offset, length, good, pattern, args)))


def metadata_clean(path, byte):
    """Exit 1 if a metadata cluster of path holds 64 bytes of byte."""
    src_dir, name = os.path.split(path)
    global src
    src = src_dir
    i = Image(name)
    cs, n = i.cs, len(i.b)
    regions = [(0, "header cluster")]

    def table(off, nbytes, what):
        if off % cs or off >= n:
            return
        for c in range(off, min(off + nbytes, n), cs):
            regions.append((c, what))

    table(i.l1_offset, i.l1_size * 8, "L1 table")
    table(i.reftable_offset, i.reftable_clusters * cs, "refcount table")
    for k in range(min(i.reftable_clusters * cs, n - i.reftable_offset) // 8):
        table(i.u64(i.reftable_offset + 8 * k) & ~0x1FF, cs, "refcount block")
    l1s = [(i.l1_offset, i.l1_size)]
    if i.nb_snapshots and i.snapshots_offset % cs == 0:
        off = i.snapshots_offset
        for k in range(min(i.nb_snapshots, 1024)):
            if off + 40 > n:
                break
            l1s.append((i.u64(off), i.u32(off + 8)))
            table(off - off % cs, cs, "snapshot table")
            off += (40 + i.u32(off + 36) + i.u16(off + 12) + i.u16(off + 14)
                    + 7) // 8 * 8
    for l1_off, l1_size in l1s:
        if l1_off % cs or l1_off >= n:
            continue
        table(l1_off, l1_size * 8, "L1 table")
        for k in range(min(l1_size, (n - l1_off) // 8)):
            table(i.u64(l1_off + 8 * k) & OFFSET_MASK, cs, "L2 table")
    bad = bytes([byte]) * 64
    for off, what in sorted(set(regions)):
        if bad in i.b[off:off + cs]:
            sys.exit("%s: guest data (0x%02x) was written into the %s at "
                     "0x%x" % (name, byte, what, off))
    sys.exit(0)


if sys.argv[1] == "--metadata-clean":
    metadata_clean(sys.argv[2], int(sys.argv[3], 0))
src, out = sys.argv[1], sys.argv[2]

MIB = 1024 * 1024
GOOD = 4 * MIB          # the second data run of every base image

# ---- open-time damage: the header fields ----------------------------

for v in ("v2", "v3"):
    def img():
        return Image(v + ".qcow2")

    def field(name, off, width, value, pattern="-"):
        i = img()
        {4: i.set32, 8: i.set64}[width](off, value)
        i.save("%s-%s" % (v, name), "open", pattern=pattern)

    field("bad-magic", 0, 4, 0x514649FA, "magic")
    field("magic-zero", 0, 4, 0, "magic")
    field("version-1", 4, 4, 1, "version")
    field("version-4", 4, 4, 4, "version")
    field("version-huge", 4, 4, 0xFFFFFFFF, "version")
    field("cluster-bits-8", 20, 4, 8, "cluster_bits")
    field("cluster-bits-22", 20, 4, 22, "cluster_bits")
    field("cluster-bits-64", 20, 4, 64, "cluster_bits")
    field("cluster-bits-huge", 20, 4, 0xFFFFFFFF, "cluster_bits")
    field("crypt-method-aes", 32, 4, 1, "encrypt")
    field("crypt-method-luks", 32, 4, 2, "encrypt")
    field("crypt-method-3", 32, 4, 3, "crypt_method")
    # CVE-2014-0143/0144 style: table sizes and offsets.
    field("l1-size-huge", 36, 4, 0x7FFFFFFF, "l1_size")
    field("l1-size-max", 36, 4, 0xFFFFFFFF, "l1_size")
    field("l1-size-too-small", 36, 4, 1, "l1_size")
    field("l1-size-zero", 36, 4, 0, "l1_size")
    i = img()
    field("l1-offset-misaligned", 40, 8, i.l1_offset + 8, "L1")
    field("l1-offset-past-eof", 40, 8, i.file_end_cluster + 64 * i.cs, "L1")
    field("l1-offset-zero", 40, 8, 0, "L1")
    field("l1-offset-wraps", 40, 8, 0xFFFFFFFFFFFFF000, "L1")
    # The L1 table starts in the file but runs past its end.
    i = img()
    i.set64(40, i.file_end_cluster - i.cs)
    i.set32(36, i.cs // 8 + 1)
    i.save(v + "-l1-runs-past-eof", "open", pattern="L1")
    field("refcount-table-clusters-zero", 56, 4, 0, "refcount")
    field("refcount-table-clusters-huge", 56, 4, 0xFFFFFFFF, "refcount")
    field("refcount-table-offset-misaligned", 48, 8, i.reftable_offset + 512,
          "refcount")
    field("refcount-table-offset-past-eof", 48, 8,
          i.file_end_cluster + 16 * i.cs, "refcount")
    field("refcount-table-offset-zero", 48, 8, 0, "refcount")
    field("nb-snapshots-huge", 60, 4, 0x7FFFFFFF, "snapshot")
    i = img()
    i.set32(60, 1)
    i.set64(64, i.file_end_cluster + 4 * i.cs)
    i.save(v + "-snapshot-table-past-eof", "open", pattern="snapshot")
    i = img()
    i.set32(60, 1)
    i.set64(64, i.l1_offset + 8)
    i.save(v + "-snapshot-table-misaligned", "open", pattern="snapshot")
    # Virtual sizes near 2^63 (the L1 table cannot cover them).
    field("size-2^63-512", 24, 8, (1 << 63) - 512, "size")
    field("size-2^63", 24, 8, 1 << 63, "size")
    field("size-max", 24, 8, 0xFFFFFFFFFFFFFFFF, "size")
    field("size-2^62", 24, 8, 1 << 62, "size")
    # The backing file name must lie in the first cluster, after the
    # header, be at most 1023 bytes and contain no NUL.
    i = img()
    i.set64(8, 1024)
    i.set32(16, 1024)
    i.b[1024:2048] = b"b" * 1024
    i.save(v + "-backing-name-too-long", "open", pattern="backing")
    i = img()
    i.set64(8, 1024)
    i.set32(16, 0xFFFFFFFF)
    i.save(v + "-backing-size-huge", "open", pattern="backing")
    i = img()
    i.set64(8, i.cs - 4)
    i.set32(16, 10)
    i.b[i.cs - 4:i.cs] = b"base"
    i.save(v + "-backing-name-crosses-cluster", "open", pattern="backing")
    i = img()
    i.set64(8, i.l1_offset)
    i.set32(16, 8)
    i.save(v + "-backing-name-outside-first-cluster", "open",
           pattern="backing")
    i = img()
    i.set64(8, 1)       # bytes 1..3 of the magic: inside the header
    i.set32(16, 3)
    i.save(v + "-backing-name-in-header", "open", pattern="backing")
    i = img()
    i.set64(8, 0xFFFFFFFFFFFFFFF0)
    i.set32(16, 100)
    i.save(v + "-backing-offset-wraps", "open", pattern="backing")
    i = img()
    i.set64(8, 1024)
    i.set32(16, 9)
    i.b[1024:1033] = b"base\0foo!"
    i.save(v + "-backing-name-nul", "open", pattern="backing")

# Version 3 only fields.
def v3():
    return Image("v3.qcow2")


def v3field(name, off, width, value, pattern="-"):
    i = v3()
    {1: lambda o, x: i.b.__setitem__(o, x), 4: i.set32, 8: i.set64}[width](
        off, value)
    i.save("v3-" + name, "open", pattern=pattern)


v3field("header-length-100", 100, 4, 100, "header_length")
v3field("header-length-108", 100, 4, 108, "header_length")
v3field("header-length-past-cluster", 100, 4, 4096 + 8, "header_length")
v3field("header-length-huge", 100, 4, 0xFFFFFFF8, "header_length")
v3field("refcount-order-7", 96, 4, 7, "refcount_order")
v3field("refcount-order-huge", 96, 4, 0xFFFFFFFF, "refcount_order")
v3field("unknown-incompat-bit-5", 72, 8, 1 << 5, "bit 5")
v3field("unknown-incompat-bit-63", 72, 8, 1 << 63, "bit 63")
v3field("compression-type-without-bit", 104, 1, 1, "compression")
v3field("compression-bit-with-deflate", 72, 8, 1 << 3, "compression")
v3field("extended-l2-with-4k-clusters", 72, 8, 1 << 4, "extended")

# An unknown incompatible bit that the image's feature name table names:
# the message must use that name.  (qemu-img 7.2 writes no feature
# table, so add one at the end of the extension list if there is none.)
i = v3()
entry = bytes([0, 5]) + b"frobnicated clusters".ljust(46, b"\0")
for off, magic, length in list(i.extensions()):
    if magic == 0x6803F857:
        i.b[off + 8:off + 8 + 48] = entry
        break
else:
    exts = list(i.extensions())
    end = exts[-1][0] + 8 + (exts[-1][2] + 7) // 8 * 8 if exts else \
        i.header_length
    assert not any(i.b[end:end + 64])
    struct.pack_into(">II", i.b, end, 0x6803F857, 48)
    i.b[end + 8:end + 56] = entry
i.set64(72, 1 << 5)
i.save("v3-unknown-incompat-bit-named", "open", pattern="frobnicated clusters")

# Header extensions with lengths running past the header area (the
# overlay's backing format extension ends where its backing name starts).
for v in ("v2", "v3", "overlay"):
    i = Image(v + ".qcow2")
    exts = list(i.extensions())
    if exts:
        off = exts[0][0]
        i.set32(off + 4, 0xFFFFFFFF)
        i.save(v + "-extension-length-huge", "open", pattern="extension")
        i = Image(v + ".qcow2")
        end = i.u64(8) or i.cs
        i.set32(off + 4, end - off - 8 + 1)
        i.save(v + "-extension-length-past-end", "open",
               pattern="extension")
    # A new unknown extension at the end of the list, too long.
    i = Image(v + ".qcow2")
    exts = list(i.extensions())
    end = exts[-1][0] + 8 + (exts[-1][2] + 7) // 8 * 8 if exts else \
        i.header_length
    struct.pack_into(">II", i.b, end, 0x12345678, 0x7FFFFFF0)
    i.save(v + "-extension-unknown-too-long", "open", pattern="extension")

# ---- open-time damage: the backing file name of an overlay ----------

i = Image("overlay.qcow2")
boff, blen = i.u64(8), i.u32(16)
assert boff and blen
i.set32(16, 1024)
i.b[boff:boff + 1024] = b"x" * 1024
i.save("overlay-backing-name-too-long", "open", pattern="backing")
i = Image("overlay.qcow2")
i.set64(8, i.cs - blen // 2)
i.save("overlay-backing-name-crosses-cluster", "open", pattern="backing")
i = Image("overlay.qcow2")
i.set64(8, i.cs + 512)
i.save("overlay-backing-name-outside-first-cluster", "open",
       pattern="backing")
i = Image("overlay.qcow2")
i.set32(16, blen + 1)
i.b[boff + blen] = 0
i.save("overlay-backing-name-nul", "open", pattern="backing")
# A backing file that is the overlay itself: a loop.
i = Image("overlay.qcow2")
name = b"overlay-backing-loop.qcow2"
i.b[boff:boff + len(name)] = name
i.set32(16, len(name))
i.save("overlay-backing-loop", "open", pattern="loop|chain")

# ---- open-time damage: the snapshot table ---------------------------

i = Image("snap.qcow2")
assert i.nb_snapshots == 1
SN = i.snapshots_offset
i.set32(60, 0x10001)
i.save("snap-nb-snapshots-too-large", "open", pattern="snapshot")
i = Image("snap.qcow2")
i.set64(64, i.file_end_cluster + i.cs)
i.save("snap-table-past-eof", "open", pattern="snapshot")
i = Image("snap.qcow2")
i.set64(64, SN + 8)
i.save("snap-table-misaligned", "open", pattern="snapshot")
# CVE-2014-0144 style: the snapshot's own L1 table.
i = Image("snap.qcow2")
i.set32(SN + 8, 0x7FFFFFFF)
i.save("snap-l1-size-huge", "open", pattern="snapshot")
i = Image("snap.qcow2")
i.set64(SN, i.u64(SN) + 8)
i.save("snap-l1-offset-misaligned", "open", pattern="snapshot")
i = Image("snap.qcow2")
i.set64(SN, i.file_end_cluster + 8 * i.cs)
i.save("snap-l1-offset-past-eof", "open", pattern="snapshot")
i = Image("snap.qcow2")
i.set32(SN + 36, 0xFFFFFFFF)
i.save("snap-extra-data-huge", "open", pattern="snapshot")
# An entry whose name runs past the end of the file.
i = Image("snap.qcow2")
assert len(i.b) - SN < 0xFFFF
i.set16(SN + 14, 0xFFFF)
i.save("snap-name-past-eof", "open", pattern="snapshot")

# ---- request-time damage: L1 and L2 entries -------------------------

def read_case(base, name, guest, mutate, good=GOOD, kind="read",
              args="-", pattern="-", length=4096):
    i = Image(base)
    mutate(i)
    i.save(name, kind, guest, length, good, pattern, args)


for v in ("v2", "v3"):
    base = v + ".qcow2"
    L1 = lambda i: i.l1_entry(0)
    L2 = lambda i: i.l2_entry(0)

    def set_l1(value_fn):
        return lambda i: i.set64(L1(i), value_fn(i, i.u64(L1(i))))

    def set_l2(value_fn):
        return lambda i: i.set64(L2(i), value_fn(i, i.u64(L2(i))))

    # Reserved bits (L1: 0-8 and 56-62).
    read_case(base, v + "-l1-reserved-bit-1", 0,
              set_l1(lambda i, e: e | 2), pattern="reserved")
    read_case(base, v + "-l1-reserved-bit-56", 0,
              set_l1(lambda i, e: e | 1 << 56), pattern="reserved")
    read_case(base, v + "-l1-compressed-flag", 0,
              set_l1(lambda i, e: e | COMPRESSED), pattern="reserved")
    read_case(base, v + "-l1-misaligned", 0,
              set_l1(lambda i, e: e + 512), pattern="L2 table")
    read_case(base, v + "-l1-past-eof", 0,
              set_l1(lambda i, e: COPIED | (i.file_end_cluster + 32 * i.cs)),
              pattern="L2 table")
    read_case(base, v + "-l1-max-offset", 0,
              set_l1(lambda i, e: COPIED | (OFFSET_MASK & ~(i.cs - 1))),
              pattern="L2 table")
    # Reserved bits (L2: 1-8 and 56-61).
    read_case(base, v + "-l2-reserved-bit-1", 0,
              set_l2(lambda i, e: e | 2), pattern="reserved")
    read_case(base, v + "-l2-reserved-bit-61", 0,
              set_l2(lambda i, e: e | 1 << 61), pattern="reserved")
    read_case(base, v + "-l2-misaligned", 0,
              set_l2(lambda i, e: e + 512), pattern="unaligned|misaligned")
    read_case(base, v + "-l2-past-eof", 0,
              set_l2(lambda i, e: COPIED | (i.file_end_cluster + 64 * i.cs)),
              pattern="end of the file|EOF")
    read_case(base, v + "-l2-max-offset", 0,
              set_l2(lambda i, e: COPIED | (OFFSET_MASK & ~(i.cs - 1))),
              pattern="end of the file|EOF")
    # Pointing into metadata: a reader need not notice (QEMU does not
    # either), so only no crash; writes must never go there (later).
    read_case(base, v + "-l2-into-header", 0,
              set_l2(lambda i, e: COPIED | i.cs * 0), kind="nocrash")
    read_case(base, v + "-l2-into-l1", 0,
              set_l2(lambda i, e: COPIED | i.l1_offset), kind="nocrash")
    read_case(base, v + "-l2-into-refcount-table", 0,
              set_l2(lambda i, e: COPIED | i.reftable_offset),
              kind="nocrash")
    read_case(base, v + "-l2-into-itself", 0,
              set_l2(lambda i, e: COPIED | (L2(i) & ~(i.cs - 1))),
              kind="nocrash")
    read_case(base, v + "-l1-into-l1", 0,
              set_l1(lambda i, e: COPIED | i.l1_offset), kind="nocrash")
    read_case(base, v + "-l1-into-header", 0,
              set_l1(lambda i, e: COPIED | 0), kind="nocrash")
    # Refcount structures are not read on the read path: no crash.
    read_case(base, v + "-refcount-entry-past-eof", 0,
              lambda i: i.set64(i.reftable_offset,
                                i.file_end_cluster + 100 * i.cs),
              kind="nocrash")
    read_case(base, v + "-refcount-entry-reserved", 0,
              lambda i: i.set64(i.reftable_offset,
                                i.u64(i.reftable_offset) | 0x1FF),
              kind="nocrash")
    # The zero flag of a version 2 image, where bit 0 is reserved: QEMU
    # fails the read ("Zero cluster entry found in pre-v3 image").
    if v == "v2":
        read_case(base, v + "-l2-zero-flag", 0,
                  set_l2(lambda i, e: e | 1), pattern="zero flag")

# ---- request-time damage: compressed clusters -----------------------

def cdesc_fields(i, e):
    x = 62 - (i.cb - 8)
    return e & ((1 << x) - 1), (e & ((1 << 62) - 1)) >> x, x


def find_compressed(i):
    """Guest offsets of the compressed clusters, by host offset."""
    found = []
    for guest in range(0, i.size, i.cs):
        l1e = i.u64(i.l1_entry(guest)) & OFFSET_MASK
        if not l1e:
            continue
        e = i.u64(i.l2_entry(guest))
        if e & COMPRESSED:
            found.append((cdesc_fields(i, e)[0], guest))
    return [g for _, g in sorted(found)]


i = Image("comp.qcow2")
comp = find_compressed(i)
assert len(comp) >= 2, "comp.qcow2: no compressed clusters"
first, last = comp[0], comp[-1]
assert last >= GOOD
# The last compressed cluster must be near the end of the file, so that
# the largest sector count runs past it.
x = 62 - (i.cb - 8)
lhost = cdesc_fields(i, i.u64(i.l2_entry(last)))[0]
assert lhost + (1 << (62 - x)) * 512 - 511 > (len(i.b) + 511) // 512 * 512, \
    "comp.qcow2: the last compressed cluster is not at the end of the file"


def set_cdesc(guest, fn):
    def mutate(i):
        off = i.l2_entry(guest)
        e = i.u64(off)
        host, sectors, x = cdesc_fields(i, e)
        host, sectors = fn(i, host, sectors, x)
        i.set64(off, (e & (3 << 62)) | (sectors << x) | host)
    return mutate


read_case("comp.qcow2", "comp-desc-past-eof", first,
          set_cdesc(first, lambda i, h, s, x: (len(i.b) + 8192, s)),
          good=last, pattern="compressed")
read_case("comp.qcow2", "comp-desc-max-offset", first,
          set_cdesc(first, lambda i, h, s, x: ((1 << x) - 1, s)),
          good=last, pattern="compressed")
# The last compressed cluster, with the largest sector count: the data
# would run past the end of the file.
read_case("comp.qcow2", "comp-desc-runs-past-eof", last,
          set_cdesc(last, lambda i, h, s, x: (h, (1 << (62 - x)) - 1)),
          good=first, pattern="compressed")
# Pointing at the header: not deflate data, must fail to decompress.
read_case("comp.qcow2", "comp-desc-into-header", first,
          set_cdesc(first, lambda i, h, s, x: (16, s)),
          good=last, pattern="compress")
read_case("comp.qcow2", "comp-desc-offset-zero", first,
          set_cdesc(first, lambda i, h, s, x: (0, s)),
          good=last, pattern="compress")
# Damaged compressed data: a reader may or may not notice.
def smash(i):
    e = i.u64(i.l2_entry(first))
    h = cdesc_fields(i, e)[0]
    for k in range(h, h + 64):
        i.b[k] ^= 0x5A
read_case("comp.qcow2", "comp-data-garbled", first, smash,
          good=last, kind="nocrash")
# A compressed entry with the COPIED flag (never valid).
read_case("comp.qcow2", "comp-copied-flag", first,
          lambda i: i.set64(i.l2_entry(first),
                            i.u64(i.l2_entry(first)) | COPIED),
          good=last, kind="nocrash")

# ---- request-time damage: extended L2 -------------------------------

def set_bitmap(fn):
    def mutate(i):
        off = i.l2_entry(0)
        i.set64(off + 8, fn(i, i.u64(off), i.u64(off + 8)))
    return mutate


read_case("extl2.qcow2", "extl2-alloc-and-zero", 0,
          set_bitmap(lambda i, e, b: b | (b & 0xFFFFFFFF) << 32),
          pattern="zero")
read_case("extl2.qcow2", "extl2-alloc-without-host", 0,
          lambda i: (i.set64(i.l2_entry(0), 0),
                     i.set64(i.l2_entry(0) + 8, 0xFFFFFFFF)),
          pattern="host cluster|allocated")
read_case("extl2.qcow2", "extl2-reserved-bit-0", 0,
          lambda i: i.set64(i.l2_entry(0), i.u64(i.l2_entry(0)) | 1),
          pattern="reserved")
read_case("extl2.qcow2", "extl2-past-eof", 0,
          lambda i: i.set64(i.l2_entry(0),
                            COPIED | (i.file_end_cluster + 8 * i.cs)),
          pattern="end of the file")

# ---- request-time damage: a snapshot's own L1 table -----------------

i = Image("snap.qcow2")
sn_l1 = i.u64(i.snapshots_offset)
read_case("snap.qcow2", "snap-l1-entry-reserved", 0,
          lambda i: i.set64(i.l1_entry(0, sn_l1),
                            i.u64(i.l1_entry(0, sn_l1)) | 2),
          args="snapshot=1", pattern="reserved")

print("\n".join(manifest))
