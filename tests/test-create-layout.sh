#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# create=true: layouts of big images, compared byte for byte with
# qemu-img create.
source "${srcdir:-$(dirname "$0")}/functions.sh"
requires python3

d=$tmp/c
mkdir "$d"

# Big images: the layout only (L1 and refcount tables of many clusters).
for opts in "cluster-size=4k size=1T" "cluster-size=512 size=1G" \
            "size=16T" "cluster-size=512 refcount-bits=64 size=4G" \
            "cluster-size=2M size=2G preallocation=metadata" \
            "size=0"; do
    img=$d/big.qcow2
    rm -f "$img" "$d/q.qcow2"
    # shellcheck disable=SC2086
    run_plugin "$img" create=true $opts -- true ||
        fail "big: create=true $opts failed"
    qemu-img check "$img" > "$d/check.out" 2>&1 ||
        { cat "$d/check.out" >&2; fail "big: qemu-img check ($opts)"; }
    qo='' sz=''
    for w in $opts; do
        case $w in
            size=*) sz=${w#size=} ;;
            *) k=${w%%=*}; qo+=${qo:+,}${k//-/_}=${w#*=} ;;
        esac
    done
    qemu-img create -q -f qcow2 ${qo:+-o "$qo"} "$d/q.qcow2" "$sz"
    case $opts in
        *refcount-bits=64*)
            # qemu-img places the extra refcount blocks elsewhere.
            [ "$(stat -c %s "$img")" = "$(stat -c %s "$d/q.qcow2")" ] ||
                fail "big: size differs from qemu-img create ($opts)" ;;
        *) cmp "$img" "$d/q.qcow2" ||
               fail "big: differs from qemu-img create -o $qo $sz" ;;
    esac
    echo "ok: create=true $opts: like qemu-img create, check clean"
done
rm -f "$d/big.qcow2" "$d/q.qcow2"

# An overlay of an NBD export (virt-v2v and libguestfs make these): the
# size comes from the export, the name is recorded as given.
if command -v qemu-nbd >/dev/null; then
    echo "--- NBD backing"
    gen_bytes 3M random > "$d/nbd-base.raw"
    truncate -s 5M "$d/nbd-base.raw"
    sock=$d/qn.sock
    qemu-nbd -r -f raw --persistent --fork --pid-file="$d/qn.pid" \
        --socket="$sock" "$d/nbd-base.raw" || fail "qemu-nbd failed"
    cleanup_fn kill "$(cat "$d/qn.pid")"
    name="nbd+unix:///?socket=$sock"
    img=$d/nbd-overlay.qcow2
    run_plugin -w "$img" create=true backing="$name" backing-format=raw -- \
        "qemu-io -f raw \"\$uri\" -c 'write -P 0x42 1M 64k' >/dev/null" ||
        fail "NBD backing: create failed"
    python3 "${srcdir:-$(dirname "$0")}/create-info.py" \
        <(qemu-img info --output=json "$img") virtual-size=5242880 \
        backing-filename="$name" backing-filename-format=raw ||
        fail "NBD backing: qemu-img info"
    qemu-img check "$img" > "$d/check.out" 2>&1 ||
        { cat "$d/check.out" >&2; fail "NBD backing: qemu-img check"; }
    cp "$d/nbd-base.raw" "$d/nbd-expect.raw"
    qemu-io -f raw "$d/nbd-expect.raw" -c 'write -P 0x42 1M 64k' >/dev/null
    rm -f "$d/got.raw"
    qemu-img convert -O raw "$img" "$d/got.raw"
    cmp "$d/nbd-expect.raw" "$d/got.raw" || fail "NBD backing: data differs"
    echo "ok: overlay of an NBD export: size from the export, check clean"
    kill "$(cat "$d/qn.pid")"
fi
