#!/usr/bin/env bash
# Zero clusters in v3 images: unallocated zero clusters (write -z on an
# empty cluster, or with -u to unmap), allocated zero clusters (write -z
# over data keeps the host cluster), and zero clusters hiding backing
# data.  Reads and maps compared with qemu.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"

size=$((16*1024*1024))
for cs in 512 4096 65536 2097152; do
    img=$tmp/zero-$cs.qcow2
    mkimg "$img" "$size" -o cluster_size=$cs
    # Fill everything with data, then punch seeded zero ranges of both
    # kinds and a few discards.
    rnd_pattern
    echo "write -P $R 0 $size" | qio "$img"
    ops=$tmp/zero-ops-$cs.txt
    : > "$ops"
    for i in $(seq 12); do
        rnd $(( size / cs - 4 )); off=$(( R * cs ))
        rnd_range 1 3; len=$(( R * cs ))
        rnd 3
        case $R in
            0) echo "write -z $off $len" ;;      # zero, allocation kept
            1) echo "write -z -u $off $len" ;;   # zero, unmapped
            2) echo "discard $off $len" ;;
        esac >> "$ops"
    done
    # A zero range that is not cluster-aligned (qemu zeroes the
    # partial clusters with data writes).
    echo "write -z $(( cs / 2 + 4 * cs )) $(( cs * 2 ))" >> "$ops"
    qio "$img" < "$ops"
    compare_read "$img"
    compare_map "$img"

    # Zero clusters in an overlay hide the backing file's data.
    # With few large clusters, the writes may by chance cover the whole
    # overlay with one kind: then other writes, until they do not.
    ov=$tmp/zero-ov-$cs.qcow2
    for try in 1 2 3 4 5; do
        mkimg "$ov" "$size" -o cluster_size=$cs -b "$img" -F qcow2
        random_fill "$ov" "$size" n=20 align=$cs maxlen=$(( cs * 4 )) zeroes=60 discards=0
        qemu_map "$ov" "$tmp/ovmap.txt"
        [ "$(wc -l < "$tmp/ovmap.txt")" -lt 2 ] || break
    done
    compare_read "$ov"
    compare_map "$ov"
done
