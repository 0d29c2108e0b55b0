#!/usr/bin/env bash
# Writing to an overlay whose backing file is on an NBD server: a seeded
# random workload of partial-cluster writes (copy-on-write reads from
# the server) and zero writes through the plugin, the same workload by
# qemu-io on a copy of the overlay, then qemu-img check (no errors, no
# leaks) and the contents compared.  Raw over NBD and qcow2 over NBD.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"
. "${srcdir:-${0%/*}}/nbd-lib.sh"

size=$((16*1024*1024))
base=$tmp/base.raw
gen_bytes "$size" random > "$base"
truncate -s $(( size + 4*1024*1024 )) "$base"
vsize=$(( size + 4*1024*1024 ))
S=$tmp/base.sock
start_backing "$S" file "$base"

qb=$tmp/qbase.qcow2
mkimg "$qb" "$vsize" -o cluster_size=4096
random_fill "$qb" "$vsize" n=30 zeroes=10 discards=0
Q=$tmp/qbase.sock
start_backing "$Q" file "$qb"

for kind in raw qcow2; do
    case $kind in
        raw) b="nbd+unix:///?socket=$S" ;;
        qcow2) b="nbd:unix:$Q" ;;
    esac
    ov=$tmp/ov-$kind.qcow2
    ref=$tmp/ref-$kind.qcow2
    mkimg "$ov" "$vsize" -u -b "$b" -F "$kind"
    cp "$ov" "$ref"
    P=$tmp/plugin-$kind.sock
    start_plugin "$P" -w "$ov" allow-remote-backing=true
    # Through the plugin, byte-granular offsets inside clusters.
    random_fill "nbd+unix:///?socket=$P" "$vsize" fmt=raw n=60 \
        maxlen=200k align=512 zeroes=20 discards=0
    stop_plugin "$P"
    qio "$ref" < "$tmp/ops.plugin-$kind.sock.txt"
    qemu-img check -q "$ov" || fail "qemu-img check $ov found problems"
    ref_raw "$ref" "$tmp/exp-$kind.raw"
    ref_raw "$ov" "$tmp/got-$kind.raw"
    assert_nonzero "$tmp/exp-$kind.raw"
    if ! cmp -s "$tmp/exp-$kind.raw" "$tmp/got-$kind.raw"; then
        show_diff "$tmp/exp-$kind.raw" "$tmp/got-$kind.raw"
        fail "$kind over NBD: contents after the workload differ from qemu's"
    fi
    # And read back through the plugin too.
    compare_read --expect "$tmp/exp-$kind.raw" "$ov" allow-remote-backing=true
    echo "ok: write workload on $kind over NBD"
done
# Several connections writing at once (fio, 4 jobs of 16 requests,
# random sizes, 512-byte aligned: copy-on-write reads from the server
# run concurrently), verified by fio, then qemu-img check, and qemu and
# the plugin must read the same.
if command -v fio >/dev/null; then
    ovc=$tmp/ov-conc.qcow2
    mkimg "$ovc" "$vsize" -u -b "nbd+unix:///?socket=$S" -F raw
    P=$tmp/plugin-conc.sock
    start_plugin "$P" -w "$ovc" allow-remote-backing=true
    {
        printf '%s\n' "[global]" "ioengine=nbd" \
            "uri=nbd+unix:///?socket=$P" "iodepth=16" "rw=randwrite" \
            "bsrange=512-200k" "blockalign=512" "size=4m" \
            "randseed=$SEED" "verify=crc32c" "verify_fatal=1" \
            "do_verify=1" "verify_state_save=0"
        for j in 0 1 2 3; do
            printf '%s\n' "[j$j]" "offset=$(( j * 4 ))m" \
                "write_iolog=$tmp/iolog.$j"
        done
    } > "$tmp/conc.fio"
    fio --output="$tmp/fio.out" "$tmp/conc.fio" ||
        { tail -20 "$tmp/fio.out"; fail "fio through the plugin failed"; }
    grep -q "err= 0" "$tmp/fio.out" || fail "fio reported errors"
    stop_plugin "$P"
    qemu-img check -q "$ovc" || fail "qemu-img check $ovc found problems"
    ref_raw "$ovc" "$tmp/exp-conc.raw"
    compare_read --expect "$tmp/exp-conc.raw" "$ovc" allow-remote-backing=true
    # Every byte fio did not write (the rest of each partly written
    # cluster included) is still the server's.
    /usr/bin/python3 - "$base" "$tmp/exp-conc.raw" "$tmp"/iolog.* <<'PYEOF' ||
import sys
base, got = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read()
ranges = []
for log in sys.argv[3:]:
    for line in open(log):
        f = line.split()
        if len(f) == 5 and f[2] == "write":
            ranges.append((int(f[3]), int(f[3]) + int(f[4])))
n = len(ranges)
if n < 20:
    sys.exit("sanity: only %d writes logged" % n)
base = base.ljust(len(got), b"\0")
pos = 0
for lo, hi in sorted(ranges) + [(len(got), len(got))]:
    if lo > pos and got[pos:lo] != base[pos:lo]:
        sys.exit("bytes in [%d, %d) were not written but differ from the "
                 "backing" % (pos, lo))
    pos = max(pos, hi)
print("ok: %d writes; every unwritten byte is the backing's" % n)
PYEOF
        fail "copy-on-write under concurrency lost backing data"
    echo "ok: concurrent writes over an NBD backing"
fi

# The server's data was never written.
gen_check=$tmp/base.check
nbdcopy "nbd+unix:///?socket=$S" "$gen_check"
cmp -s "$base" "$gen_check" || fail "the NBD backing was modified"
echo "PASS"
