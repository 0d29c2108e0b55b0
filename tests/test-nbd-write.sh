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
# The server's data was never written.
gen_check=$tmp/base.check
nbdcopy "nbd+unix:///?socket=$S" "$gen_check"
cmp -s "$base" "$gen_check" || fail "the NBD backing was modified"
echo "PASS"
