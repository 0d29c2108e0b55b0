#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# Snapshot operations on the damaged images of make-damaged.py (bad
# header fields, tables, entries, snapshot tables...): each image gets
# one of snapshot-create, snapshot-apply and snapshot-delete (in turn),
# run offline with --run true.  It must never crash or hang; when it
# fails, the file must be unchanged; when it succeeds on an image that
# qemu-img check found clean, qemu-img check must still find no errors.

[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -u
export LC_ALL=C
export PATH=/usr/bin:$PATH

progname=${0##*/}
srcdir=${srcdir:-${0%/*}}

fail () { echo "$progname: FAIL: $*" >&2; exit 1; }
skip () { echo "$progname: SKIP: $*" >&2; exit 77; }

: "${PLUGIN:?PLUGIN must be set to the path of nbdkit-qcow2-plugin.so}"
for c in nbdkit qemu-img qemu-io python3 timeout cmp; do
    command -v "$c" >/dev/null 2>&1 || skip "$c not installed"
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/nbdkit-qcow2-snapdmg.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/src" "$tmp/d"

# The good images make-damaged.py expects (as in test-damaged.sh).
qio () { qemu-io -f qcow2 "$@" >/dev/null || fail "qemu-io $* failed"; }
mk () { qemu-img create -q -f qcow2 "$@" || fail "qemu-img create $* failed"; }
cd "$tmp/src" || exit 1
mk -o compat=0.10,cluster_size=4096 v2.qcow2 8M
qio -c 'write -P 0x11 0 64k' -c 'write -P 0x22 4M 64k' v2.qcow2
mk -o compat=1.1,cluster_size=4096 v3.qcow2 8M
qio -c 'write -P 0x11 0 64k' -c 'write -P 0x22 4M 64k' v3.qcow2
qemu-img convert -c -f qcow2 -O qcow2 -o cluster_size=4096 v3.qcow2 comp.qcow2 ||
    fail "qemu-img convert -c failed"
cp v3.qcow2 snap.qcow2
qemu-img snapshot -c s1 snap.qcow2 || fail "qemu-img snapshot failed"
qio -c 'write -P 0x33 0 4k' snap.qcow2
cp v3.qcow2 base.qcow2
mk -o cluster_size=4096 -b base.qcow2 -F qcow2 overlay.qcow2
qio -c 'write -P 0x44 4M 4k' overlay.qcow2
mk -o cluster_size=16k,extended_l2=on extl2.qcow2 8M
qio -c 'write -P 0x11 0 64k' -c 'write -P 0x22 4M 64k' extl2.qcow2
cd - >/dev/null || exit 1

python3 "$srcdir/make-damaged.py" "$tmp/src" "$tmp/d" > "$tmp/manifest" ||
    fail "make-damaged.py failed"
cp "$tmp/src/base.qcow2" "$tmp/d/"
n=$(wc -l < "$tmp/manifest")
[ "$n" -ge 100 ] || fail "make-damaged.py made only $n images"

ops=(snapshot-create=new snapshot-apply=s1 snapshot-delete=s1)
i=0 nok=0 nfail=0 nchecked=0
while IFS=$'\t' read -r name kind off len good pat args; do
    img=$tmp/d/$name
    [ -f "$img" ] || continue
    op=${ops[i % 3]}
    i=$(( i + 1 ))
    plugin_args=()
    [ "$args" = - ] || plugin_args=($args)
    cp "$img" "$tmp/w.qcow2"
    clean=0
    qemu-img check "$tmp/w.qcow2" >/dev/null 2>&1 || clean=$?
    r=0
    timeout 60 nbdkit -U - "$PLUGIN" file="$tmp/w.qcow2" "${plugin_args[@]}" \
        "$op" --run true > "$tmp/log" 2>&1 || r=$?
    if [ $r -ge 124 ] ||
       grep -qE 'AddressSanitizer|runtime error|Assertion|Segmentation fault|core dumped' "$tmp/log"; then
        cat "$tmp/log" >&2
        fail "$name $op: crashed or hung (status $r)"
    fi
    if [ $r -ne 0 ]; then
        nfail=$(( nfail + 1 ))
        cmp -s "$tmp/w.qcow2" "$img" || {
            cat "$tmp/log" >&2
            fail "$name $op: failed but changed the file"
        }
        continue
    fi
    nok=$(( nok + 1 ))
    if [ $clean -eq 0 ]; then
        a=0
        qemu-img check "$tmp/w.qcow2" > "$tmp/check" 2>&1 || a=$?
        [ $a -eq 0 ] || [ $a -eq 3 ] || {
            cat "$tmp/check" >&2
            fail "$name $op: a clean image now has errors (check exited $a)"
        }
        nchecked=$(( nchecked + 1 ))
    fi
done < "$tmp/manifest"
[ $nok -gt 0 ] && [ $nfail -gt 0 ] || fail "sanity: $nok succeeded, $nfail failed"
echo "$progname: $i damaged images: $nfail refused unchanged, $nok done ($nchecked of them checked clean by qemu-img)"
