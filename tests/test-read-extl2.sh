#!/usr/bin/env bash
# Extended L2 entries (extended_l2=on): each cluster is split into 32
# subclusters that are allocated, zero or unallocated independently.
# Cluster sizes 16k..2M, subcluster-sized writes and zeroes, with and
# without a backing file (unallocated subclusters read from it), and
# compressed clusters (which have no subcluster bitmap).
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"

size=$((24*1024*1024))
base=$tmp/base.qcow2
mkimg "$base" "$size"
rnd_pattern
echo "write -P $R 0 $size" | qio "$base"
random_fill "$base" "$size" n=20 zeroes=0 discards=0

for cs in 16384 32768 65536 262144 2097152; do
    sc=$(( cs / 32 ))
    for with_backing in no yes; do
        img=$tmp/ext-$cs-$with_backing.qcow2
        if [ $with_backing = yes ]; then
            mkimg "$img" "$size" -o extended_l2=on,cluster_size=$cs -b "$base" -F qcow2
        else
            mkimg "$img" "$size" -o extended_l2=on,cluster_size=$cs
        fi
        qemu-img info "$img" | grep -q 'extended l2: true' ||
            fail "sanity: $img does not have extended L2 entries"
        ops=$tmp/ops-$cs-$with_backing.txt
        : > "$ops"
        # Subcluster-granular writes and zeroes inside a few clusters, so
        # that single clusters mix allocated, zero and unallocated
        # subclusters.
        nclusters=$(( size / cs ))
        for i in $(seq 16); do
            rnd "$nclusters"; c=$(( R * cs ))
            for j in 1 2 3; do
                rnd 31; s=$R
                rnd_range 1 $(( 32 - s )); n=$R
                rnd 3
                case $R in
                    0) echo "write -z $(( c + s * sc )) $(( n * sc ))" ;;
                    1) echo "discard $(( c + s * sc )) $(( n * sc ))" ;;
                    *) rnd_pattern
                       echo "write -P $R $(( c + s * sc )) $(( n * sc ))" ;;
                esac >> "$ops"
            done
        done
        # A write that is not subcluster aligned (qemu fills the rest of
        # the subcluster from below) and zeroes spanning clusters.
        rnd_pattern
        echo "write -P $R $(( cs + sc / 2 + 512 )) $(( sc * 2 ))" >> "$ops"
        echo "write -z $(( 3 * cs - 2 * sc )) $(( cs + 4 * sc ))" >> "$ops"
        qio "$img" < "$ops"
        compare_read "$img"
        compare_map "$img"
    done
done

# Compressed clusters in an extended-L2 image, over a backing file.
img=$tmp/ext-compressed.qcow2
mkimg "$img" "$size" -o extended_l2=on,cluster_size=65536 -b "$base" -F qcow2
: > "$tmp/ops-c.txt"
for i in 1 2 3 4 5; do
    rnd_pattern
    echo "write -c -P $R $(( i * 7 * 65536 )) 65536" >> "$tmp/ops-c.txt"
done
echo "write -P 9 $(( 7 * 65536 + 4096 )) 2048" >> "$tmp/ops-c.txt"
qio "$img" < "$tmp/ops-c.txt"
assert_compressed "$img"
compare_read "$img"
compare_map --allow-uniform "$img"   # the base is all data
