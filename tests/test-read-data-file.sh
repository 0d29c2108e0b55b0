#!/usr/bin/env bash
# External data files (data_file=...): guest data lives in a separate
# file at the same offsets the L2 tables give; with data_file_raw=on the
# data file is itself a valid raw image of the guest.  Also the
# data-file= override, relative data file names, and a missing data
# file refused.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"

size=$((24*1024*1024))
for raw in off on; do
    for cs in 4096 65536; do
        img=$tmp/df-$raw-$cs.qcow2
        data=$tmp/df-$raw-$cs.data
        mkimg "$img" "$size" -o data_file="$data",data_file_raw=$raw,cluster_size=$cs
        qemu-img info "$img" | grep -q 'data file:' ||
            fail "sanity: $img has no external data file"
        random_fill "$img" "$size" n=40
        ref=$tmp/df.raw
        ref_raw "$img" "$ref"
        compare_read --expect "$ref" "$img"
        compare_map --hole-only "$img"
        if [ $raw = on ]; then
            # Independent check: with data_file_raw=on the data file
            # itself must equal the guest view.
            cmp -s "$ref" "$data" ||
                fail "sanity: data_file_raw=on data file differs from qemu's view"
        fi

        # data-file= override: move the data file away; the image's
        # recorded name no longer exists, so it must be refused, and
        # served correctly when data-file= names the new place.
        mv "$data" "$data.moved"
        expect_refused "${data##*/}" "$img"
        compare_read --expect "$ref" "$img" data-file="$data.moved"
        mv "$data.moved" "$data"
    done
done

# data-file= pointing at a different file changes what is read: make a
# copy of a data file with different content at the allocated offsets.
img=$tmp/df-off-65536.qcow2
data=$tmp/df-off-65536.data
ref_raw "$img" "$tmp/orig.raw"
other=$tmp/other.data
cp "$data" "$other"
/usr/bin/python3 -c '
import sys
with open(sys.argv[1], "r+b") as f:
    d = f.read().translate(bytes(i ^ 0x5a for i in range(256)))
    f.seek(0); f.write(d)' "$other"
# Reference: a copy of the image pointing at the other data file.
cp "$img" "$tmp/df-other.qcow2"
qemu-img amend -o data_file="$other" "$tmp/df-other.qcow2"
qemu-img info "$tmp/df-other.qcow2" | grep -q "data file: $other" ||
    fail "sanity: amend did not change the data file name"
ref_raw "$tmp/df-other.qcow2" "$tmp/other.raw"
cmp -s "$tmp/other.raw" "$tmp/orig.raw" &&
    fail "sanity: the other data file gives the same guest data"
compare_read --expect "$tmp/other.raw" "$img" data-file="$other"

# A relative data file name.  (qemu 7.2 resolves it against the
# current directory, not the image's, so only the case where the two
# agree is checked: everything runs from the image's directory.)
mkdir "$tmp/sub"
(
    cd "$tmp/sub"
    mkimg rel.qcow2 8M -o data_file=rel.data
    qemu-img info rel.qcow2 | grep -q '^    data file: rel.data' ||
        fail "sanity: data file name is not relative"
    random_fill rel.qcow2 8M n=10
    ref_raw rel.qcow2 "$tmp/rel.raw"
    compare_read --expect "$tmp/rel.raw" "$tmp/sub/rel.qcow2"
)
