#!/usr/bin/env bash
# Basic reads: qcow2 v3 images with the default 64k clusters, seeded
# random writes, zeroes and discards, compared byte for byte with
# qemu-img convert.  Served both with -r and without.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"

# A 32 MiB image with a seeded mix of writes, zeroes and discards.
img=$tmp/basic.qcow2
mkimg "$img" 32M
random_fill "$img" $((32*1024*1024)) n=60
compare_read "$img"
compare_read -w "$img"

# A virtual size that is not a multiple of the cluster size (the last
# cluster is partial), with data written right up to the end.
size=$(( 20*1024*1024 + 3*512 ))
img2=$tmp/odd-size.qcow2
mkimg "$img2" "$size"
random_fill "$img2" "$size" n=20 maxlen=128k
rnd_pattern
echo "write -P $R $(( size - 2048 )) 2048" | qio "$img2"
compare_read "$img2"

# A fresh, empty image reads as zeros and has the right size.
img3=$tmp/empty.qcow2
mkimg "$img3" 8M
compare_read --allow-zero "$img3"

# Byte-granular writes (qemu does read-modify-write of the cluster).
img4=$tmp/bytes.qcow2
mkimg "$img4" 4M
random_fill "$img4" $((4*1024*1024)) n=50 align=1 maxlen=70000 zeroes=0 discards=0
compare_read "$img4"

# A small L2 cache must not change what is read.
ref=$tmp/basic.raw
ref_raw "$img" "$ref"
compare_read --expect "$ref" "$img" l2-cache-size=65536

# Resized images: grown (the L1 table is enlarged, data written past
# the old end) and shrunk (clusters past the new end are dropped).
img5=$tmp/resized.qcow2
mkimg "$img5" 8M -o cluster_size=4096
random_fill "$img5" 8M n=20
qemu-img resize -q "$img5" 600M
random_fill "$img5" 600M n=20 lo=500M maxlen=2M
compare_read "$img5"
compare_map "$img5"
qemu-img resize -q --shrink "$img5" $(( 6*1024*1024 + 512 ))
compare_read "$img5"
compare_map "$img5"

# An image written by qemu-img convert (a different allocator from
# qemu-io's: contiguous data clusters, tables after data).
img6=$tmp/converted.qcow2
qemu-img convert -q -O qcow2 -o cluster_size=16384 "$img" "$img6"
compare_read --expect "$ref" "$img6"

# Unknown compatible and autoclear feature bits must be ignored, and
# persistent dirty bitmaps do not change what is read.
img7=$tmp/features.qcow2
mkimg "$img7" 8M
random_fill "$img7" 8M n=15
qemu-img bitmap --add "$img7" bm
random_fill "$img7" 8M n=5
ref_raw "$img7" "$tmp/features.raw"
/usr/bin/python3 -c '
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(80)
    compat, autoclear = struct.unpack(">QQ", f.read(16))
    f.seek(80)
    f.write(struct.pack(">QQ", compat | 1 << 40, autoclear | 1 << 40))' "$img7"
compare_read --expect "$tmp/features.raw" "$img7"
compare_read -w --expect "$tmp/features.raw" "$img7"
