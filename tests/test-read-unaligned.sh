#!/usr/bin/env bash
# Reads at odd offsets and of odd lengths (1 byte up to several
# clusters), many of them straddling cluster and L2-table boundaries,
# issued with the nbd Python bindings and compared with the same bytes
# of qemu's raw conversion.  Covers plain, compressed, extended-L2 and
# backing-chain images, and the last bytes of an odd-sized disk.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"
requires_nbd_python

cat > "$tmp/reads.py" <<'PYEOF'
import random, sys
import nbd
uri, ref_path, seed, cs, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ref = open(ref_path, "rb").read()
size = len(ref)
h = nbd.NBD()
h.connect_uri(uri)
assert h.get_size() == size, "size %d, expected %d" % (h.get_size(), size)
r = random.Random(seed)
l2_span = cs * (cs // 8)
nonzero = 0
for i in range(count):
    kind = r.randrange(6)
    if kind == 0:       # anywhere, short
        off = r.randrange(size); n = r.randint(1, 700)
    elif kind == 1:     # straddling a cluster boundary
        b = r.randrange(1, size // cs) * cs
        off = b - r.randint(1, min(b, cs + 3)); n = r.randint(1, 3 * cs + 7)
    elif kind == 2:     # straddling an L2 table's reach, if the disk has one
        b = (r.randrange(1, max(2, size // l2_span)) * l2_span) % size or cs
        off = max(0, b - r.randint(1, 5000)); n = r.randint(1, 70000)
    elif kind == 3:     # the very end of the disk
        n = r.randint(1, 9000); off = size - n
    elif kind == 4:     # long and odd
        off = r.randrange(size); n = r.randint(cs, 4 * cs + 4095)
    else:               # very long: many clusters in one request
        off = r.randrange(size); n = r.randint(1, 3 * 1024 * 1024)
    n = min(n, size - off, 32 * 1024 * 1024)
    if n <= 0:
        continue
    got = h.pread(n, off)
    exp = ref[off:off + n]
    if got != exp:
        j = next(k for k in range(n) if got[k] != exp[k])
        sys.exit("read(off=%d, len=%d): first difference at guest offset %d "
                 "(0x%x): expected %s, got %s" % (off, n, off + j, off + j,
                 exp[j:j + 16].hex(), got[j:j + 16].hex()))
    if any(exp):
        nonzero += 1
if nonzero < count // 10:
    sys.exit("sanity: only %d of %d reads saw non-zero data" % (nonzero, count))
print("%d reads ok (%d with data)" % (count, nonzero))
PYEOF

# unaligned_reads IMG CLUSTER_SIZE [plugin args...]
unaligned_reads ()
{
    local img=$1 cs=$2
    shift 2
    ref_raw "$img" "$tmp/ref.raw"
    assert_nonzero "$tmp/ref.raw"
    rnd 1000000000
    run_plugin "$img" "$@" -- /usr/bin/python3 "$tmp/reads.py" '"$uri"' \
        "$tmp/ref.raw" "$R" "$cs" 400 ||
        fail "unaligned reads from ${img##*/} differ from qemu"
    echo "ok: unaligned reads ${img##*/}"
}

size=$(( 12*1024*1024 + 1536 ))    # not a multiple of any cluster size
for cs in 512 4096 65536 2097152; do
    img=$tmp/u-$cs.qcow2
    mkimg "$img" "$size" -o cluster_size=$cs
    random_fill "$img" "$size" n=60 align=1 maxlen=$(( cs * 3 > 262144 ? cs * 3 : 262144 ))
    unaligned_reads "$img" $cs
done

# Compressed (zstd), over the 4k image as backing.
gen_bytes "$size" text > "$tmp/text.raw"
qemu-img convert -q -c -f raw -O qcow2 -o compression_type=zstd,cluster_size=65536 \
    "$tmp/text.raw" "$tmp/u-comp.qcow2"
assert_compressed "$tmp/u-comp.qcow2"
unaligned_reads "$tmp/u-comp.qcow2" 65536

# Compressed clusters mixed with everything else in one request:
# adjacent compressed clusters, overwritten (uncompressed) ones,
# discarded ones, zeroes, and compressed clusters written later (so
# not adjacent in the file to their guest neighbours).
img=$tmp/u-mixed.qcow2
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096 "$tmp/text.raw" "$img"
random_fill "$img" "$size" n=40 align=512 maxlen=40k zeroes=25 discards=25
: > "$tmp/wc.txt"
for i in $(seq 40); do
    rnd $(( size / 4096 )); off=$(( R * 4096 ))
    rnd_pattern
    printf 'discard %d 4096\nwrite -c -P %d %d 4096\n' "$off" "$R" "$off" >> "$tmp/wc.txt"
done
qio "$img" < "$tmp/wc.txt"
assert_compressed "$img"
unaligned_reads "$img" 4096

# Extended L2 with subcluster writes, over a backing file.
img=$tmp/u-ext.qcow2
mkimg "$img" "$size" -o extended_l2=on,cluster_size=32768 -b "$tmp/u-4096.qcow2" -F qcow2
random_fill "$img" "$size" n=60 align=1024 maxlen=20k zeroes=25 discards=15
unaligned_reads "$img" 32768

# Depth-3 chain with a raw base shorter than the top.
gen_bytes $(( 7*1024*1024 + 333 )) random > "$tmp/base.raw"
mkimg "$tmp/mid.qcow2" 9M -o cluster_size=4096 -b "$tmp/base.raw" -F raw
random_fill "$tmp/mid.qcow2" 9M n=20 zeroes=30 discards=20
mkimg "$tmp/top.qcow2" "$size" -o cluster_size=65536 -b "$tmp/mid.qcow2" -F qcow2
random_fill "$tmp/top.qcow2" "$size" n=10 align=1 maxlen=100k
unaligned_reads "$tmp/top.qcow2" 4096
