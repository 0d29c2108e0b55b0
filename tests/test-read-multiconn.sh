#!/usr/bin/env bash
# Several clients at once against one nbdkit: nbdcopy with 4
# connections and many requests in flight, several nbdcopy processes
# in parallel, and a random-read client alongside them.  Every copy
# must equal qemu's conversion.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"
requires_nbd_python

size=$((48*1024*1024))
base=$tmp/base.qcow2
mkimg "$base" "$size" -o cluster_size=4096
random_fill "$base" "$size" n=60
img=$tmp/mc.qcow2
mkimg "$img" "$size" -o cluster_size=65536 -b "$base" -F qcow2
random_fill "$img" "$size" n=60 zeroes=20 discards=10
# Some compressed clusters too.
: > "$tmp/c.txt"
for i in 1 2 3 4 5 6; do
    rnd_pattern; echo "discard $(( i * 5 * 1048576 )) 65536" >> "$tmp/c.txt"
    echo "write -c -P $R $(( i * 5 * 1048576 )) 65536" >> "$tmp/c.txt"
done
qio "$img" < "$tmp/c.txt"
ref=$tmp/ref.raw
ref_raw "$img" "$ref"
assert_nonzero "$ref"

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

rnd 1000000000
cat > "$tmp/run.sh" <<EOF2
set -e
uri=\$1
nbdcopy --connections=4 --requests=16 "\$uri" $tmp/out0.raw &
p0=\$!
nbdcopy --connections=2 "\$uri" $tmp/out1.raw &
p1=\$!
nbdcopy --connections=1 --request-size=65536 "\$uri" $tmp/out2.raw &
p2=\$!
/usr/bin/python3 $tmp/random-reads.py "\$uri" $ref $R &
p3=\$!
r=0
for p in \$p0 \$p1 \$p2 \$p3; do wait \$p || r=1; done
exit \$r
EOF2
run_plugin "$img" -- bash "$tmp/run.sh" '"$uri"' || fail "parallel clients failed"
for i in 0 1 2; do
    if ! cmp -s "$ref" "$tmp/out$i.raw"; then
        show_diff "$ref" "$tmp/out$i.raw"
        fail "copy $i made in parallel differs from qemu"
    fi
done
echo "ok: 3 parallel nbdcopy (7 connections) + 3 random readers"

# The same image served with -r and without, with multi-conn copies.
compare_read "$img"
compare_read -w "$img"

# Many connections sharing a small L2 cache: 512-byte clusters (each L2
# table covers only 32 KiB) and the 4 KiB minimum cache, so tables are
# evicted and reloaded while other requests are using them.
small=$tmp/small-cluster.qcow2
mkimg "$small" "$size" -o cluster_size=512
random_fill "$small" "$size" n=80 maxlen=2M
ref_raw "$small" "$tmp/small.raw"
assert_nonzero "$tmp/small.raw"
rnd 1000000000
cat > "$tmp/run2.sh" <<EOF2
set -e
uri=\$1
nbdcopy --connections=4 --requests=32 --request-size=32768 "\$uri" $tmp/s0.raw &
p0=\$!
nbdcopy --connections=4 --requests=32 "\$uri" $tmp/s1.raw &
p1=\$!
/usr/bin/python3 $tmp/random-reads.py "\$uri" $tmp/small.raw $R &
p2=\$!
r=0
for p in \$p0 \$p1 \$p2; do wait \$p || r=1; done
exit \$r
EOF2
run_plugin "$small" l2-cache-size=4096 -- bash "$tmp/run2.sh" '"$uri"' ||
    fail "parallel clients with a small L2 cache failed"
for i in 0 1; do
    if ! cmp -s "$tmp/small.raw" "$tmp/s$i.raw"; then
        show_diff "$tmp/small.raw" "$tmp/s$i.raw"
        fail "parallel copy $i with l2-cache-size=4096 differs from qemu"
    fi
done
echo "ok: parallel clients with l2-cache-size=4096 and 512-byte clusters"
