#!/usr/bin/env bash
# qcow2 version 2 (compat=0.10) images: no zero-cluster flag, no
# header extensions beyond the basics, refcount_bits fixed at 16.
# Cluster sizes 4k and 64k, plain and as an overlay, compressed.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"

size=$((24*1024*1024))
for cs in 4096 65536; do
    img=$tmp/v2-$cs.qcow2
    mkimg "$img" "$size" -o compat=0.10,cluster_size=$cs
    qemu-img info "$img" | grep -q 'compat: 0.10' ||
        fail "sanity: $img is not a v2 image"
    random_fill "$img" "$size" n=50 maxlen=512k
    compare_read "$img"
    compare_map "$img"

    # v2 overlay over a v2 base: "write -z" cannot use a zero flag in v2,
    # so qemu writes real zeros over the backing data.
    base=$tmp/v2-base-$cs.qcow2
    mkimg "$base" "$size" -o compat=0.10,cluster_size=$cs
    random_fill "$base" "$size" n=30 zeroes=0 discards=0
    ov=$tmp/v2-ov-$cs.qcow2
    mkimg "$ov" "$size" -o compat=0.10,cluster_size=$cs -b "$base" -F qcow2
    random_fill "$ov" "$size" n=30 maxlen=256k zeroes=30
    compare_read "$ov"
    compare_map "$ov"
done

# A compressed v2 image (deflate is the only compression v2 knows).
src=$tmp/src.raw
{ gen_bytes $((2*1024*1024)) text; gen_bytes $((1024*1024)) random
  head -c $((1024*1024)) /dev/zero; gen_bytes $((3*1024*1024)) text; } > "$src"
cimg=$tmp/v2-compressed.qcow2
qemu-img convert -q -c -f raw -O qcow2 -o compat=0.10 "$src" "$cimg"
compare_read --expect "$src" "$cimg"
compare_read "$cimg"
