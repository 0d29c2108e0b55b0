#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# Regenerate the seed corpus fuzz/corpus/ for fuzz/fuzz-image.c from
# images made by qemu-img and qemu-io.  The seeds are committed; run
# this only to change them:  fuzz/make-corpus.sh [OUTDIR]
#
# Every seed is a small image (1 MiB virtual size, so that it stays
# well under 64 KiB, except the 64 KiB-cluster one, which cannot be
# smaller than its four metadata clusters) followed by the operation
# trailer that fuzz-image.c describes: a few reads and block-status
# calls over the clusters the image has.

set -e
set -u
export LC_ALL=C
PATH=/usr/bin:$PATH

here=$(cd "${0%/*}" && pwd)
out=${1:-$here/corpus}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"

qio () { qemu-io "$@" >/dev/null; }
mk () { qemu-img create -q -f qcow2 "$@"; }

# Guest data used by most seeds: two patterns, a zeroed range, a hole.
fill ()
{
    local img=$1 fmt=${2:-qcow2}
    qio -f "$fmt" -c 'write -P 0x61 0 8k' -c 'write -P 0x62 12k 1k' \
        -c 'write -z 16k 8k' -c 'write -P 0x63 768k 4k' "$img"
}

# trailer FILE FLAGS "KIND ARG LEN OFF" ...: append the op list.
trailer ()
{
    python3 - "$@" <<'EOF'
import struct, sys
path, flags = sys.argv[1], int(sys.argv[2])
ops = [tuple(int(x, 0) for x in op.split()) for op in sys.argv[3:]]
with open(path, "ab") as f:
    for kind, arg, length, off in ops:
        f.write(struct.pack(">BBHQ", kind, arg, length, off))
    f.write(bytes([flags, len(ops)]))
EOF
}

# The default op list: reads across cluster and subcluster edges, the
# status of the whole disk, and a read of the last byte.
OPS=("0 1 15 0" "0 0 1 4095" "1 1 2047 0" "0 0 511 12288" "0 1 7 16384"
     "0 0 4095 786432" "1 0 65535 8192" "0 0 0 1048575")

seed ()
{
    local name=$1 img=$2 flags=${3:-0}
    cp "$img" "$out/$name"
    trailer "$out/$name" "$flags" "${OPS[@]}"
}

cd "$tmp"

mk -o compat=0.10,cluster_size=4096 v2-4k.qcow2 1M && fill v2-4k.qcow2
seed v2-4k v2-4k.qcow2

mk -o compat=1.1,cluster_size=512 v3-512.qcow2 1M && fill v3-512.qcow2
seed v3-512 v3-512.qcow2

# 40 KiB of contiguous host data across the 32 KiB that one L2 table of
# 512-byte clusters covers: reads merge runs from two tables.
mk -o compat=1.1,cluster_size=512 v3-512-contiguous.qcow2 1M
qio -c 'write -P 0x61 0 40k' v3-512-contiguous.qcow2
seed v3-512-contiguous v3-512-contiguous.qcow2

mk -o compat=1.1,cluster_size=4096 v3-4k.qcow2 1M && fill v3-4k.qcow2
qio -c 'discard 4k 4k' v3-4k.qcow2
seed v3-4k v3-4k.qcow2
seed v3-4k-tiny-cache v3-4k.qcow2 2

mk -o compat=1.1,cluster_size=4096,refcount_bits=1,lazy_refcounts=on \
    v3-4k-refcount1.qcow2 1M && fill v3-4k-refcount1.qcow2
seed v3-4k-refcount1 v3-4k-refcount1.qcow2

mk -o compat=1.1 v3-64k.qcow2 1M
qio -c 'write -P 0x61 0 4k' -c 'write -z 64k 64k' v3-64k.qcow2
seed v3-64k v3-64k.qcow2

# Compressed, deflate and zstd, from a raw file with varied data.
qemu-img create -q -f raw data.raw 1M
fill data.raw raw
qio -f raw -c 'write -P 0x64 64k 4k' -c 'write -P 0x65 66k 1k' data.raw
qemu-img convert -c -f raw -O qcow2 -o cluster_size=4096 data.raw deflate.qcow2
seed v3-4k-deflate deflate.qcow2
qemu-img convert -c -f raw -O qcow2 -o cluster_size=4096,compression_type=zstd \
    data.raw zstd.qcow2
seed v3-4k-zstd zstd.qcow2
qemu-img convert -c -f raw -O qcow2 -o cluster_size=512 data.raw deflate-512.qcow2
seed v3-512-deflate deflate-512.qcow2

# Extended L2 with 16 KiB clusters (512-byte subclusters): allocated,
# zero and unallocated subclusters within one cluster.
mk -o compat=1.1,cluster_size=16k,extended_l2=on extl2.qcow2 1M
qio -c 'write -P 0x61 0 512' -c 'write -z 1024 512' -c 'write -P 0x62 2560 1k' \
    -c 'write -z 64k 16k' extl2.qcow2
seed v3-16k-extl2 extl2.qcow2

# An internal snapshot, then the active layer moves on.  Served both
# ways: the active layer, and snapshot "1" (flag bit 0).
mk -o compat=1.1,cluster_size=4096 snap.qcow2 1M && fill snap.qcow2
qemu-img snapshot -c s1 snap.qcow2
qio -c 'write -P 0x71 0 4k' -c 'write -P 0x72 512k 4k' snap.qcow2
seed v3-4k-snapshot snap.qcow2
seed v3-4k-snapshot-served snap.qcow2 1

# An overlay naming a backing file (not followed by q2_open_io).
mk -o compat=1.1,cluster_size=4096 base.qcow2 1M && fill base.qcow2
mk -o compat=1.1,cluster_size=4096 -b base.qcow2 -F qcow2 overlay.qcow2
qio -c 'write -P 0x81 4k 4k' overlay.qcow2
seed v3-4k-overlay overlay.qcow2

# Encrypted with the password fuzz-image.c gives ("fuzz"): legacy AES,
# and LUKS (cast5-128-cbc, the smallest key area, with sha512 and the
# lowest iter-time so that the iteration counts stay under the fuzz
# build's cap of 2048).  qemu-img may need a retry under load.
sec=(--object secret,id=s0,data=fuzz)
mk "${sec[@]}" -o encrypt.format=aes,encrypt.key-secret=s0,cluster_size=4096 \
    aes.qcow2 1M
qio "${sec[@]}" -c 'write -P 0x61 0 8k' -c 'write -z 16k 8k' \
    --image-opts driver=qcow2,file.filename=aes.qcow2,encrypt.key-secret=s0
seed v3-4k-aes aes.qcow2
for _ in 1 2 3 4 5 6; do
    mk "${sec[@]}" -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=1,encrypt.hash-alg=sha512,encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc,cluster_size=512 \
        luks.qcow2 64k 2>/dev/null && break
done
qio "${sec[@]}" -c 'write -P 0x61 0 8k' -c 'write -P 0x62 12k 1k' \
    --image-opts driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=s0
seed v3-512-luks luks.qcow2

ls -l "$out"
