#!/usr/bin/env bash
# Backing chains: qcow2 and raw backing files, chains of depth 3 and 4
# with mixed cluster sizes, zero clusters and discards in a middle
# layer, backing files shorter than the overlay, relative backing
# names, the backing= and backing-format= overrides, and the refusals:
# a backing file with no recorded format (never probed), a missing
# backing file, a loop, and a chain longer than 32 images.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"

size=$((24*1024*1024))

# Depth 4, every layer a different cluster size.  The middle layers
# zero and discard ranges over the data below them.
l0=$tmp/l0.qcow2; l1=$tmp/l1.qcow2; l2=$tmp/l2.qcow2; l3=$tmp/l3.qcow2
mkimg "$l0" "$size" -o cluster_size=4096
rnd_pattern; echo "write -P $R 0 $size" | qio "$l0"
random_fill "$l0" "$size" n=30 zeroes=0 discards=0
mkimg "$l1" "$size" -o cluster_size=65536 -b "$l0" -F qcow2
random_fill "$l1" "$size" n=40 zeroes=35 discards=25
mkimg "$l2" "$size" -o cluster_size=512 -b "$l1" -F qcow2
random_fill "$l2" "$size" n=30 maxlen=200k zeroes=20 discards=20
mkimg "$l3" "$size" -o cluster_size=2M -b "$l2" -F qcow2
random_fill "$l3" "$size" n=4 maxlen=3M align=512 zeroes=0 discards=0
compare_read "$l3"
compare_map "$l3"
compare_read "$l2"
compare_map "$l2"
compare_read "$l1"

# Raw backing files, directly and at the bottom of a depth-3 chain.
rawb=$tmp/base.raw
gen_bytes "$size" random > "$rawb"
# Leave a hole in the raw file too.
truncate -s $(( size + 8*1024*1024 )) "$rawb"
ovr=$tmp/over-raw.qcow2
mkimg "$ovr" $(( size + 8*1024*1024 )) -b "$rawb" -F raw
random_fill "$ovr" $(( size + 8*1024*1024 )) n=30
compare_read "$ovr"
compare_map --hole-only "$ovr"
top=$tmp/over-raw-top.qcow2
mkimg "$top" $(( size + 8*1024*1024 )) -o cluster_size=16384 -b "$ovr" -F qcow2
random_fill "$top" $(( size + 8*1024*1024 )) n=20 zeroes=30
compare_read "$top"
compare_map --hole-only "$top"

# Backing files shorter than the overlay: the part past the backing
# file's end reads as zeros.  One qcow2 backing file, one raw backing
# file whose size is not even a multiple of 512.
short=$tmp/short.qcow2
mkimg "$short" 6M
rnd_pattern; echo "write -P $R 0 6M" | qio "$short"
ovs=$tmp/over-short.qcow2
mkimg "$ovs" 16M -b "$short" -F qcow2
rnd_pattern; echo "write -P $R $(( 6*1024*1024 - 4096 )) 8192" | qio "$ovs"
compare_read "$ovs"
compare_map "$ovs"
shortraw=$tmp/short.raw
gen_bytes $(( 5*1024*1024 + 1001 )) random > "$shortraw"
ovsr=$tmp/over-short-raw.qcow2
mkimg "$ovsr" 16M -b "$shortraw" -F raw
rnd_pattern; echo "write -P $R 12M 4096" | qio "$ovsr"
compare_read "$ovsr"
compare_map "$ovsr"

# A backing file larger than the overlay: only the overlay's size is
# exported.
ovsmall=$tmp/over-small.qcow2
mkimg "$ovsmall" $(( 5*1024*1024 + 512 )) -b "$l1" -F qcow2
random_fill "$ovsmall" $(( 5*1024*1024 + 512 )) n=10
# A zeroed cluster, so that the map has more than one run whatever the
# seed put below it.
echo "write -z 1M 64k" | qio "$ovsmall"
compare_read "$ovsmall"
compare_map "$ovsmall"

# Snapshots in an overlay read through to the backing file.
ovsnap=$tmp/over-snap.qcow2
mkimg "$ovsnap" "$size" -b "$l1" -F qcow2
random_fill "$ovsnap" "$size" n=15 zeroes=30
qemu-img snapshot -c s "$ovsnap"
random_fill "$ovsnap" "$size" n=15
ref_raw "$ovsnap" "$tmp/ovsnap.raw" -l snapshot.name=s
compare_read --expect "$tmp/ovsnap.raw" "$ovsnap" snapshot=s
compare_read "$ovsnap"
rm -f "$tmp/ovsnap.raw"

# A chain whose middle layer keeps its data in an external data file.
mid=$tmp/mid-df.qcow2
mkimg "$mid" "$size" -o data_file="$tmp/mid-df.data" -b "$l0" -F qcow2
random_fill "$mid" "$size" n=20 zeroes=30
topdf=$tmp/top-df.qcow2
mkimg "$topdf" "$size" -o cluster_size=4096 -b "$mid" -F qcow2
random_fill "$topdf" "$size" n=20
compare_read "$topdf"
compare_map --hole-only "$topdf"

# backing=none: the top layer alone.  The reference is a copy whose
# backing link was removed with qemu-img rebase -u.
cp "$l2" "$tmp/l2-alone.qcow2"
qemu-img rebase -u -b '' "$tmp/l2-alone.qcow2"
ref_none=$tmp/l2-alone.raw
ref_raw "$tmp/l2-alone.qcow2" "$ref_none"
ref_full=$tmp/l2-full.raw
ref_raw "$l2" "$ref_full"
cmp -s "$ref_none" "$ref_full" &&
    fail "sanity: backing=none reference equals the full chain"
compare_read --expect "$ref_none" "$l2" backing=none
compare_map --ref "$tmp/l2-alone.qcow2" "$l2" backing=none

# backing=PATH replaces the backing file named in the image; with
# backing-format= too.  References again come from rebased copies.
alt=$tmp/alt.qcow2
mkimg "$alt" "$size"
random_fill "$alt" "$size" n=20 zeroes=0 discards=0
cp "$l2" "$tmp/l2-alt.qcow2"
qemu-img rebase -u -b "$alt" -F qcow2 "$tmp/l2-alt.qcow2"
ref_alt=$tmp/l2-alt.raw
ref_raw "$tmp/l2-alt.qcow2" "$ref_alt"
cmp -s "$ref_alt" "$ref_full" &&
    fail "sanity: backing=PATH reference equals the original chain"
compare_read --expect "$ref_alt" "$l2" backing="$alt"
compare_read --expect "$ref_alt" "$l2" backing="$alt" backing-format=qcow2
cp "$l2" "$tmp/l2-altraw.qcow2"
qemu-img rebase -u -b "$rawb" -F raw "$tmp/l2-altraw.qcow2"
ref_raw "$tmp/l2-altraw.qcow2" "$tmp/l2-altraw.raw"
compare_read --expect "$tmp/l2-altraw.raw" "$l2" backing="$rawb" backing-format=raw
rm -f "$ref_alt" "$tmp/l2-altraw.raw" "$ref_none"

# Relative backing names are relative to the overlay's directory, not
# to the current directory.
mkdir "$tmp/sub"
mkimg "$tmp/sub/rb.qcow2" 8M
rnd_pattern; echo "write -P $R 1M 2M" | qio "$tmp/sub/rb.qcow2"
( cd "$tmp/sub" && mkimg ro.qcow2 8M -b rb.qcow2 -F qcow2 )
qemu-img info "$tmp/sub/ro.qcow2" | grep -q '^backing file: rb.qcow2' ||
    fail "sanity: backing name is not relative"
ref_raw "$tmp/sub/ro.qcow2" "$tmp/ro.raw"
( cd / && compare_read --expect "$tmp/ro.raw" "$tmp/sub/ro.qcow2" )

# No recorded backing format: refused, never probed, unless
# backing-format= is given.
for fmt in qcow2 raw; do
    if [ $fmt = qcow2 ]; then b=$l1; else b=$rawb; fi
    nf=$tmp/nofmt-$fmt.qcow2
    mkimg "$nf" "$size" -b "$b" -F $fmt
    random_fill "$nf" "$size" n=10 zeroes=0 discards=0
    ref_raw "$nf" "$tmp/nofmt.raw"
    strip_backing_format "$nf"
    qemu-img info "$nf" 2>/dev/null | grep -q 'backing file format' &&
        fail "sanity: $nf still records a backing format"
    expect_refused 'backing-format=' "$nf"
    compare_read --expect "$tmp/nofmt.raw" "$nf" backing-format=$fmt
done
rm -f "$tmp/nofmt.raw"

# backing-format= with a format the plugin does not support.
expect_refused 'backing-format|vmdk|format' "$l2" backing-format=vmdk

# Missing backing files, named by the image or by backing=.
mkimg "$tmp/gone.qcow2" 1M
mkimg "$tmp/orphan.qcow2" 1M -b "$tmp/gone.qcow2" -F qcow2
rm "$tmp/gone.qcow2"
expect_refused 'gone\.qcow2' "$tmp/orphan.qcow2"
expect_refused 'nonexistent' "$l2" backing="$tmp/nonexistent.qcow2"

# Loops: an image backed by itself, and A -> B -> A.
mkimg "$tmp/self.qcow2" 1M
qemu-img rebase -u -b "$tmp/self.qcow2" -F qcow2 "$tmp/self.qcow2"
expect_refused 'loop|cycle|chain|backing' "$tmp/self.qcow2"
mkimg "$tmp/A.qcow2" 1M
mkimg "$tmp/B.qcow2" 1M -b "$tmp/A.qcow2" -F qcow2
qemu-img rebase -u -b "$tmp/B.qcow2" -F qcow2 "$tmp/A.qcow2"
qemu-img info "$tmp/A.qcow2" | grep -q "^backing file: $tmp/B.qcow2" ||
    fail "sanity: A is not backed by B"
expect_refused 'loop|cycle|chain|backing' "$tmp/A.qcow2"
expect_refused 'loop|cycle|chain|backing' "$tmp/B.qcow2"

# Chain length: 32 images (counting the top) are followed, 33 are not.
# Every layer writes its own cluster, so all 32 must be read.
prev=
for i in $(seq 1 33); do
    c=$tmp/chain$i.qcow2
    if [ -z "$prev" ]; then
        mkimg "$c" 4M -o cluster_size=4096
    else
        mkimg "$c" 4M -o cluster_size=4096 -b "$prev" -F qcow2
    fi
    echo "write -P $i $(( i * 65536 )) 4096" | qio "$c"
    prev=$c
done
compare_read "$tmp/chain32.qcow2"
expect_refused 'chain|deep|depth|long|backing' "$tmp/chain33.qcow2"
# ... but backing=none on the 33rd is fine.
cp "$tmp/chain33.qcow2" "$tmp/chain33-alone.qcow2"
qemu-img rebase -u -b '' "$tmp/chain33-alone.qcow2"
ref_raw "$tmp/chain33-alone.qcow2" "$tmp/c33.raw"
compare_read --expect "$tmp/c33.raw" "$tmp/chain33.qcow2" backing=none
