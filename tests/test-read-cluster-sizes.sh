#!/usr/bin/env bash
# Every interesting cluster size, from 512 bytes to 2 MiB, with seeded
# writes scaled to the cluster size; reads and maps compared with qemu.
# The smallest sizes also run with a 4 KiB L2 cache (the minimum) so that L2 tables
# are evicted and reloaded.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"

for cs in 512 1024 4096 16384 65536 262144 1048576 2097152; do
    size=$(( cs >= 1048576 ? 48*1024*1024 : 16*1024*1024 ))
    img=$tmp/cs-$cs.qcow2
    mkimg "$img" "$size" -o cluster_size=$cs
    # Some writes aligned to clusters, some not.
    # Fewer, shorter writes for big clusters, so that holes remain.
    if [ "$cs" -ge 262144 ]; then n=6 mult=2; else n=25 mult=8; fi
    random_fill "$img" "$size" n=$n align=$cs maxlen=$(( cs * mult ))
    random_fill "$img" "$size" n=$n align=512 maxlen=$(( cs * 2 ))
    compare_read "$img"
    compare_map "$img"
    if [ "$cs" -le 4096 ]; then
        ref=$tmp/cs-$cs.raw
        ref_raw "$img" "$ref"
        compare_read --expect "$ref" "$img" l2-cache-size=4096
        rm -f "$ref"
    fi
done

# Image size not a multiple of a big cluster, written at the very end.
size=$(( 5*1024*1024 + 512 ))
img=$tmp/cs-2M-tail.qcow2
mkimg "$img" "$size" -o cluster_size=2M
rnd_pattern
printf 'write -P %d %d 512\nwrite -P 3 0 1000\n' "$R" $(( size - 512 )) | qio "$img"
compare_read "$img"
