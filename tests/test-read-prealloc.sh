#!/usr/bin/env bash
# Preallocated images: preallocation=metadata (clusters allocated in
# L2, host file sparse), falloc and full, before and after guest
# writes.  Allocated-but-never-written clusters must read as zeros.
# Maps are compared on the HOLE bit only (qemu also reports ZERO for
# clusters whose host range is a hole in the file) and every range the
# plugin calls ZERO is checked to read as zeros.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"

size=$((24*1024*1024))
for pa in metadata falloc full; do
    for cs in 4096 65536 2097152; do
        img=$tmp/pa-$pa-$cs.qcow2
        mkimg "$img" "$size" -o preallocation=$pa,cluster_size=$cs
        compare_read --allow-zero "$img"
        random_fill "$img" "$size" n=30 zeroes=20 discards=15
        compare_read "$img"
        compare_map --hole-only --allow-uniform "$img"
    done
done

# preallocation with a backing file (qemu needs extended L2 for that): allocated clusters in the overlay
# hide the backing data (they read as zeros, not as the backing file).
base=$tmp/pa-base.qcow2
mkimg "$base" "$size"
rnd_pattern; echo "write -P $R 0 $size" | qio "$base"
ov=$tmp/pa-ov.qcow2
mkimg "$ov" "$size" -o preallocation=metadata,extended_l2=on -b "$base" -F qcow2
random_fill "$ov" "$size" n=10 zeroes=0 discards=0
compare_read "$ov"
compare_map --hole-only --allow-uniform "$ov"
