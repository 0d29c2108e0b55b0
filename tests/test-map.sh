#!/usr/bin/env bash
# Extents (NBD block status) compared with qemu-nbd for plain images:
# allocated data, unallocated clusters, zero clusters (plain and
# allocated), compressed clusters, at cluster sizes 512 to 2M, v2 and
# v3.  Block status queried at seeded odd offsets must agree with the
# full map.  A big mostly-empty image reports its holes (which is what
# lets nbdcopy skip them).
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"
requires qemu-nbd nbdinfo
requires_nbd_python

cat > "$tmp/probe.py" <<'PYEOF'
# Query block status at seeded offsets; the first extent's flags must
# be the type qemu's map gives at that offset, and it must not run
# past the end of that run (runs of one type are merged, so a longer
# extent would contradict the map).
import random, sys
import nbd
uri, map_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
runs = [tuple(map(int, l.split())) for l in open(map_path)]
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
size = h.get_size()
r = random.Random(seed)
for i in range(300):
    off = r.randrange(size)
    count = min(r.randint(1, 8 * 1024 * 1024), size - off)
    got = []
    def cb(ctx, o, entries, err):
        if ctx == nbd.CONTEXT_BASE_ALLOCATION:
            got.extend(entries)
        return 0
    h.block_status(count, off, cb)
    if not got or got[0] == 0:
        sys.exit("block_status(%d, %d): no extent" % (count, off))
    run = next(x for x in runs if x[0] <= off < x[0] + x[1])
    if (got[1] & 3) != run[2]:
        sys.exit("block_status at %d: flags %d, qemu says %d for [%d, +%d)"
                 % (off, got[1], run[2], run[0], run[1]))
    if got[0] > run[0] + run[1] - off:
        sys.exit("block_status at %d: extent of %d runs past qemu's run "
                 "[%d, +%d) of type %d" % (off, got[0], run[0], run[1], run[2]))
print("300 block status probes ok")
PYEOF

# map_probe IMG: compare_map, then probe at seeded offsets.
map_probe ()
{
    local img=$1
    compare_map "$img"
    local qmap
    qmap=$(ls -t "$tmp"/map.qemu.* | head -1)   # the one just made
    rnd 1000000000
    run_plugin "$img" -- /usr/bin/python3 "$tmp/probe.py" '"$uri"' "$qmap" "$R" ||
        fail "block status probes on ${img##*/} failed"
}

size=$((32*1024*1024))
for compat in 1.1 0.10; do
    for cs in 512 4096 65536 2097152; do
        img=$tmp/m-$compat-$cs.qcow2
        mkimg "$img" "$size" -o compat=$compat,cluster_size=$cs
        ops=$tmp/ops.txt
        : > "$ops"
        nc=$(( size / cs ))
        # Data, zeroes over data (allocated zero clusters in v3), zeroes
        # over nothing, discards, compressed clusters.
        for i in $(seq 10); do
            rnd "$nc"; c=$R; rnd_range 1 6; n=$R
            [ $(( c + n )) -le "$nc" ] || c=$(( nc - n ))
            rnd_pattern
            echo "write -P $R $(( c * cs )) $(( n * cs ))" >> "$ops"
            rnd 3
            case $R in
                0) echo "write -z $(( c * cs )) $cs" >> "$ops" ;;
                1) echo "discard $(( (c + n - 1) * cs )) $cs" >> "$ops" ;;
            esac
        done
        for i in 1 2 3; do
            rnd "$nc"; echo "write -z $(( R * cs )) $(( cs * 2 > size - R * cs ? cs : cs * 2 ))" >> "$ops"
        done
        for i in 1 2 3; do
            rnd "$nc"
            echo "discard $(( R * cs )) $cs" >> "$ops"
            echo "write -c -P 9 $(( R * cs )) $cs" >> "$ops"
        done
        qio "$img" < "$ops"
        assert_compressed "$img"
        map_probe "$img"
    done
done

# A 64 GiB image with a few MiB of data: the plugin must report the
# holes, i.e. nearly everything, so clients like nbdcopy can skip them.
big=$tmp/big.qcow2
bigsize=$(( 64 * 1024 * 1024 * 1024 ))
mkimg "$big" "$bigsize"
: > "$ops"
for i in $(seq 8); do
    rnd $(( bigsize / 65536 - 16 ))
    echo "write -P $(( i + 1 )) $(( R * 65536 )) 1M" >> "$ops"
done
qio "$big" < "$ops"
map_probe "$big"
pmap=$(ls -t "$tmp"/map.plugin.* | grep -v raw | head -1)
holes=$(awk '$3 % 2 == 1 { s += $2 } END { printf "%.0f\n", s }' "$pmap")
data=$(awk '$3 % 2 == 0 { s += $2 } END { printf "%.0f\n", s }' "$pmap")
echo "big image: $holes bytes reported as holes, $data as data"
[ "$data" -ge $(( 1024 * 1024 )) ] || fail "big image: data not reported"
[ "$data" -le $(( 9 * 1024 * 1024 )) ] || fail "big image: holes reported as data"
[ $(( holes + data )) -eq "$bigsize" ] || fail "big image: map does not cover the disk"
