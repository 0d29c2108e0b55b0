#!/usr/bin/env bash
# Encrypted images, writing: seeded qemu-io workloads (unaligned writes,
# write -z, discards) through the plugin on LUKS and legacy AES images,
# v2 and v3, 4 KiB and 64 KiB clusters, and on backing chains (LUKS
# over plain, LUKS over LUKS with another password).  The same workload
# is applied to a raw file; afterwards qemu-img check (with the secret)
# must be clean and qemu-img must read back the raw file's content.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"
. "${srcdir:-${0%/*}}/encrypt-lib.sh"

size=$((8*1024*1024))
it=encrypt.iter-time=10
sock=$tmp/sock

# run_workload NAME IMGOPTS IMG [discard] -- plugin params...
run_workload ()
{
    local name=$1 io=$2 img=$3 disc=$4
    shift 5
    eraw "$io" "$tmp/ref.raw"
    make_ops "$tmp/ops.$name" "$size" 40 "$disc"
    rm -f "$sock"
    nbdkit -f -U "$sock" "$PLUGIN" "file=$img" "$@" 2> "$tmp/nbdkit.$name.log" &
    local pid=$!
    cleanup_fn kill -9 "$pid"
    for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
    [ -S "$sock" ] || { cat "$tmp/nbdkit.$name.log"; fail "$name: nbdkit did not start"; }
    nbd_qio "nbd+unix:///?socket=$sock" < "$tmp/ops.$name"
    kill -TERM "$pid"
    wait "$pid" || { cat "$tmp/nbdkit.$name.log"; fail "$name: nbdkit exited badly"; }
    qio "$tmp/ref.raw" raw < "$tmp/ops.$name"
    echeck "$io"
    eraw "$io" "$tmp/got.raw"
    cmp "$tmp/ref.raw" "$tmp/got.raw" || fail "$name: content differs after the workload"
    echo "$name: ok"
}

# Images without a backing file (discards read as zeros there).
a=$tmp/luks-v3.qcow2; b=$tmp/luks-v2-4k.qcow2
c=$tmp/aes-v2.qcow2; d=$tmp/aes-v3-4k.qcow2
( mkenc "$a" "$size" "encrypt.format=luks,$it" ) &
p1=$!
mkenc "$b" "$size" "encrypt.format=luks,$it,encrypt.cipher-alg=twofish-256,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha512,compat=0.10,cluster_size=4096"
wait $p1 || fail "qemu-img create failed"
mkenc "$c" "$size" "encrypt.format=aes,compat=0.10"
mkenc "$d" "$size" "encrypt.format=aes,cluster_size=4096"
for img in "$a" "$b" "$c" "$d"; do
    rnd_pattern; echo "write -P $R 1M 2M" | eqio "$(iopts "$img")"
done
run_workload luks-v3 "$(iopts "$a")" "$a" discard -- password=+"$tmp/pw"
run_workload luks-v2-4k "$(iopts "$b")" "$b" discard -- password=+"$tmp/pw"
run_workload aes-v2 "$(iopts "$c")" "$c" discard -- password=+"$tmp/pw"
run_workload aes-v3-4k "$(iopts "$d")" "$d" discard -- password=+"$tmp/pw"

# Concurrent requests (qemu-io aio) that share sectors: partial-sector
# read-modify-writes must not undo each other.
aio_ops ()
{
    local base i off=0 len
    for base in 0 1048576 3000000 7000000; do
        off=$base
        for (( i = 0; i < 12; i++ )); do
            rnd 700; len=$(( R + 1 )); rnd_pattern
            echo "aio_write -P $R $off $len"
            off=$(( off + len ))
        done
        echo "aio_write -z $off 1000"
    done
    echo "aio_flush"
}
aio_ops > "$tmp/ops.aio"
cp "$tmp/ops.aio" "$tmp/ops.aio.raw"
eraw "$(iopts "$a")" "$tmp/ref.raw"
rm -f "$sock"
nbdkit -f -U "$sock" "$PLUGIN" "file=$a" password=+"$tmp/pw" 2> "$tmp/nbdkit.aio.log" &
pid=$!
cleanup_fn kill -9 "$pid"
for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
nbd_qio "nbd+unix:///?socket=$sock" < "$tmp/ops.aio"
kill -TERM "$pid"; wait "$pid" || fail "aio: nbdkit exited badly"
sed 's/^aio_write/write/; /aio_flush/d' "$tmp/ops.aio.raw" | qio "$tmp/ref.raw" raw
echeck "$(iopts "$a")"
eraw "$(iopts "$a")" "$tmp/got.raw"
cmp "$tmp/ref.raw" "$tmp/got.raw" || fail "concurrent partial-sector writes lost data"
echo "aio same-sector: ok"

# LUKS (extended L2, 32 KiB clusters) over a plain qcow2 base:
# subcluster copy-on-write copies plain data up and encrypts it.
base=$tmp/base.qcow2; top=$tmp/top.qcow2
mkimg "$base" "$size"
random_fill "$base" "$size" n=20 zeroes=10 discards=0
mkenc "$top" "$size" "encrypt.format=luks,$it,cluster_size=32k,extended_l2=on" -b "$base" -F qcow2
run_workload luks-over-plain "$(iopts "$top")" "$top" "" -- password=+"$tmp/pw"

# LUKS (password 1) over LUKS (password 2): backing-password=.
ebase=$tmp/ebase.qcow2; etop=$tmp/etop.qcow2
retry qemu-img create -q -f qcow2 "${SEC[@]}" \
    -o "encrypt.format=luks,encrypt.key-secret=s1,$it,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256" \
    "$ebase" "$size" || fail "create $ebase"
make_ops "$tmp/ops.ebase" "$size" 20
eqio "$(iopts "$ebase" s1)" < "$tmp/ops.ebase"
mkenc "$etop" "$size" "encrypt.format=luks,$it" -u -b "$ebase" -F qcow2
eio="$(iopts "$etop"),backing.encrypt.key-secret=s1"
# Without backing-password= the base gets password= and is refused.
nbdkit -U - "$PLUGIN" file="$etop" password=+"$tmp/pw" --run true 2>&1 |
    grep -q "ebase.qcow2: invalid password" || fail "wrong backing password not refused"
eraw "$eio" "$tmp/exp.raw"
plugin_read "$etop" "$tmp/got.raw" password=+"$tmp/pw" backing-password=+"$tmp/pw2"
cmp "$tmp/exp.raw" "$tmp/got.raw" || fail "LUKS over LUKS: read differs"
run_workload luks-over-luks "$eio" "$etop" "" -- \
    password=+"$tmp/pw" backing-password=+"$tmp/pw2"
