#!/usr/bin/env bash
# refcount_bits 1..64 change only the refcount structures, never what
# the guest reads; images of every width must read back as qemu says,
# including after snapshots (refcounts > 1) where the width allows.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"

size=$((16*1024*1024))
for rb in 1 2 4 8 16 32 64; do
    for cs in 512 65536; do
        img=$tmp/rb-$rb-$cs.qcow2
        mkimg "$img" "$size" -o refcount_bits=$rb,cluster_size=$cs
        qemu-img info "$img" | grep -q "refcount bits: $rb\$" ||
            fail "sanity: $img does not have refcount_bits=$rb"
        random_fill "$img" "$size" n=40 maxlen=300k
        if [ "$rb" -ge 2 ]; then
            # A snapshot shares clusters (refcount 2); overwrite some.
            qemu-img snapshot -c snap "$img"
            random_fill "$img" "$size" n=15 maxlen=200k
        fi
        compare_read "$img"
    done
done
compare_map "$tmp/rb-1-65536.qcow2"
compare_map "$tmp/rb-64-512.qcow2"
