#!/usr/bin/env bash
# Several clients at once against one nbdkit: nbdcopy with 4
# connections and many requests in flight, several nbdcopy processes
# in parallel, and a random-read client with 3 connections alongside
# them.  Every copy must equal qemu's conversion.  Scenarios: a
# backing chain with compressed clusters, a fully compressed image
# (decompression from many threads), and 512-byte clusters with the
# minimum 4 KiB L2 cache (tables evicted while others use them).
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"
requires_nbd_python

cat > "$tmp/random-reads.py" <<'PYEOF'
import random, sys
import nbd
uri, ref_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
ref = open(ref_path, "rb").read()
hs = []
for _ in range(3):
    h = nbd.NBD()
    h.connect_uri(uri)
    hs.append(h)
r = random.Random(seed)
for i in range(600):
    h = hs[i % 3]
    off = r.randrange(len(ref)); n = min(r.randint(1, 300000), len(ref) - off)
    if h.pread(n, off) != ref[off:off + n]:
        sys.exit("random read off=%d len=%d differs" % (off, n))
print("random reads ok")
PYEOF

cat > "$tmp/run.sh" <<'EOF2'
# run.sh URI REF SEED OUTPREFIX: three nbdcopy processes (7
# connections) and the random reader, all at once.
set -e
uri=$1 ref=$2 seed=$3 out=$4
nbdcopy --connections=4 --requests=32 "$uri" "$out.0" &
p0=$!
nbdcopy --connections=2 --request-size=32768 "$uri" "$out.1" &
p1=$!
nbdcopy --connections=1 --request-size=65536 "$uri" "$out.2" &
p2=$!
/usr/bin/python3 "$(dirname "$0")/random-reads.py" "$uri" "$ref" "$seed" &
p3=$!
r=0
for p in $p0 $p1 $p2 $p3; do wait $p || r=1; done
exit $r
EOF2

# parallel_check IMG [plugin args...]
parallel_check ()
{
    local img=$1 i
    shift
    local ref=$tmp/ref.raw
    ref_raw "$img" "$ref"
    assert_nonzero "$ref"
    rnd 1000000000
    run_plugin "$img" "$@" -- bash "$tmp/run.sh" '"$uri"' "$ref" "$R" "$tmp/out" ||
        fail "parallel clients on ${img##*/} $* failed"
    for i in 0 1 2; do
        if ! cmp -s "$ref" "$tmp/out.$i"; then
            show_diff "$ref" "$tmp/out.$i"
            fail "copy $i of ${img##*/} $*, made in parallel, differs from qemu"
        fi
    done
    rm -f "$tmp"/out.*
    echo "ok: parallel clients on ${img##*/} $*"
}

size=$((48*1024*1024))

# A chain with zeroes, discards and some compressed clusters on top.
base=$tmp/base.qcow2
mkimg "$base" "$size" -o cluster_size=4096
random_fill "$base" "$size" n=60
img=$tmp/mc.qcow2
mkimg "$img" "$size" -o cluster_size=65536 -b "$base" -F qcow2
random_fill "$img" "$size" n=60 zeroes=20 discards=10
: > "$tmp/c.txt"
for i in 1 2 3 4 5 6; do
    rnd_pattern; echo "discard $(( i * 5 * 1048576 )) 65536" >> "$tmp/c.txt"
    echo "write -c -P $R $(( i * 5 * 1048576 )) 65536" >> "$tmp/c.txt"
done
qio "$img" < "$tmp/c.txt"
assert_compressed "$img"
parallel_check "$img"
compare_read "$img"
compare_read -w "$img"

# Fully compressed images, zlib and zstd.
gen_bytes 40M text > "$tmp/text.raw"
for ct in zlib zstd; do
    qemu-img convert -q -c -f raw -O qcow2 \
        -o compression_type=$ct,cluster_size=65536 "$tmp/text.raw" "$tmp/c-$ct.qcow2"
    assert_compressed "$tmp/c-$ct.qcow2"
    parallel_check "$tmp/c-$ct.qcow2"
done

# 512-byte clusters (each L2 table covers only 32 KiB) with the
# minimum L2 cache.
small=$tmp/small-cluster.qcow2
mkimg "$small" "$size" -o cluster_size=512
random_fill "$small" "$size" n=80 maxlen=2M
parallel_check "$small" l2-cache-size=4096
