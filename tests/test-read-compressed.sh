#!/usr/bin/env bash
# Compressed clusters: deflate (the default) and zstd, made with
# qemu-img convert -c and with qemu-io write -c, at several cluster
# sizes, mixed with incompressible data (which qemu stores
# uncompressed), zeros, and later uncompressed overwrites.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"

# Source data: compressible text, incompressible noise, zeros, and a
# byte pattern, each in seeded amounts.
src=$tmp/src.raw
: > "$src"
for i in 1 2 3 4; do
    rnd_range 1 1500; gen_bytes $(( R * 1024 + 17 )) text >> "$src"
    rnd_range 1 700;  gen_bytes $(( R * 1024 + 5 )) random >> "$src"
    rnd_range 0 2;    head -c $(( R * 1024 * 1024 )) /dev/zero >> "$src"
    rnd_pattern
    /usr/bin/python3 -c "import sys; sys.stdout.buffer.write(bytes([$R]) * 300000)" >> "$src"
done
# A zero run long enough to cover whole 2 MiB clusters, then more text.
head -c $(( 5 * 1024 * 1024 )) /dev/zero >> "$src"
gen_bytes 100000 text >> "$src"
# Round up to a multiple of 512 so qemu does not pad the virtual size.
truncate -s $(( ( $(stat -c %s "$src") + 511 ) / 512 * 512 )) "$src"
assert_nonzero "$src"

for ct in zlib zstd; do
    for cs in 4096 65536 2097152; do
        img=$tmp/c-$ct-$cs.qcow2
        qemu-img convert -q -c -f raw -O qcow2 \
            -o compression_type=$ct,cluster_size=$cs "$src" "$img"
        qemu-img info "$img" | grep -q "compression type: $ct" ||
            fail "sanity: $img does not use $ct"
        assert_compressed "$img"
        # The guest data must equal the source, whatever qemu says.
        compare_read --expect "$src" "$img"
        compare_map "$img"

        # Overwrite parts of the compressed image, then write some
        # compressed clusters directly with qemu-io write -c (which
        # needs an unallocated cluster, hence the discard first).
        nclusters=$(( $(stat -c %s "$src") / cs ))
        random_fill "$img" "$(stat -c %s "$src")" n=10 maxlen=$(( cs * 2 )) align=512
        ops=$tmp/wc.txt
        : > "$ops"
        for i in 1 2 3 4; do
            rnd "$nclusters"; off=$(( R * cs ))
            rnd_pattern
            printf 'discard %d %d\nwrite -c -P %d %d %d\n' \
                "$off" "$cs" "$R" "$off" "$cs" >> "$ops"
        done
        qio "$img" < "$ops"
        assert_compressed "$img"
        compare_read "$img"
    done
done

# A compressed overlay on top of a compressed base.
base=$tmp/c-zlib-65536.qcow2
ov=$tmp/c-ov.qcow2
mkimg "$ov" "$(stat -c %s "$src")" -b "$base" -F qcow2 -o compression_type=zstd
ops=$tmp/ov-ops.txt
: > "$ops"
for i in $(seq 8); do
    rnd 4; off=$(( (i * 5 + R) * 65536 ))   # distinct clusters
    rnd_pattern
    echo "write -c -P $R $off 65536" >> "$ops"
done
qio "$ov" < "$ops"
assert_compressed "$ov"
compare_read "$ov"
compare_map "$ov"

# A compressed cluster that is the last thing in the file: its
# descriptor may claim more sectors than the file still has.
# One time in 512 the compressed data ends on a sector boundary by
# chance: then other data, until it does not.
for cs in 512 4096 65536 2097152; do
    img=$tmp/c-eof-$cs.qcow2
    for try in 1 2 3 4 5; do
        mkimg "$img" 8M -o cluster_size=$cs
        gen_bytes "$cs" text > "$tmp/cluster.bin"
        echo "write -c -s $tmp/cluster.bin $(( 3 * cs )) $cs" | qio "$img"
        assert_compressed "$img"
        [ $(( $(stat -c %s "$img") % 512 )) -eq 0 ] || break
    done
    [ $(( $(stat -c %s "$img") % 512 )) -ne 0 ] ||
        fail "sanity: $img does not end inside compressed data"
    compare_read "$img"
done
