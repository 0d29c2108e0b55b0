#!/usr/bin/env bash
# Offsets above 4 GiB (and around the 2 GiB and 4 GiB boundaries) in
# big sparse images: 32-bit truncation anywhere in the offset
# arithmetic shows up here.  Cluster sizes 512 (many L2 tables, large
# L1 index) and 64k; also an overlay over a big base.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"
requires_nbd_python

G=$((1024*1024*1024))
size=$(( 5*G + 3*1024*1024 ))

# Whole-image nbdcopy+cmp of 5 GiB would be slow, so compare_read_sparse
# compares every data range in full and samples the holes.
for cs in 512 65536; do
    img=$tmp/big-$cs.qcow2
    mkimg "$img" "$size" -o cluster_size=$cs
    ops=$tmp/ops-$cs.txt
    : > "$ops"
    for off in $(( 2*G - 4096 )) $(( 4*G - 65536 )) $(( 4*G )) \
               $(( 4*G + 12345*512 )) $(( size - 8192 )); do
        rnd_pattern; echo "write -P $R $off 8192" >> "$ops"
    done
    # Seeded writes anywhere above 4 GiB.
    for i in $(seq 6); do
        rnd $(( (size - 4*G) / 512 - 400 ))
        off=$(( 4*G + R * 512 ))
        rnd_range 1 300; len=$(( R * 512 ))
        rnd_pattern; echo "write -P $R $off $len" >> "$ops"
    done
    echo "write -z $(( 4*G + 4096 )) 4096" >> "$ops"
    qio "$img" < "$ops"
    compare_read_sparse "$img"
    compare_map "$img"
done

# An overlay (4k clusters) over the 64k-cluster base, written only
# above 4 GiB.
ov=$tmp/big-ov.qcow2
mkimg "$ov" "$size" -o cluster_size=4096 -b "$tmp/big-65536.qcow2" -F qcow2
random_fill "$ov" "$size" n=8 lo=$(( 4*G )) maxlen=256k zeroes=20 discards=0
compare_read_sparse "$ov"
compare_map "$ov"
