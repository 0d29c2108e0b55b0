#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# create=true with LUKS: the layout of q2_create around a LUKS area
# (which the plugin gets from issue 8's header builder), checked with
# an area taken from an image qemu-img made.
source "${srcdir:-$(dirname "$0")}/functions.sh"
requires python3

d=$tmp/c
mkdir "$d"

# The LUKS layout, with an area qemu-img built: q2_create must lay it
# out exactly as qemu-img does, and qemu must open the result with
# the secret.
tool=${top_builddir:-$(dirname "$0")/..}/tests/create-luks-area
[ -x "$tool" ] || fail "$tool not built"
for opts in "" "cluster-size=4096 preallocation=metadata compat=0.10"; do
    echo "--- luks layout: $opts"
    rm -f "$d/q.qcow2" "$d/l.qcow2" "$d/area"
    qo=encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10
    for w in $opts; do
        k=${w%%=*}; qo+=,${k//-/_}=${w#*=}
    done
    for try in 1 2 3; do
        qemu-img create -q -f qcow2 --object secret,id=s0,data=secret123 \
            -o "$qo" "$d/q.qcow2" 16M && break
        [ $try -lt 3 ] || fail "qemu-img create -o $qo failed"
        rm -f "$d/q.qcow2"
    done
    python3 - "$d/q.qcow2" "$d/area" <<'PYEOF'
import struct, sys
d = open(sys.argv[1], "rb").read()
v = struct.unpack(">I", d[4:8])[0]
off = 72 if v == 2 else struct.unpack(">I", d[100:104])[0]
while True:
    t, n = struct.unpack(">II", d[off:off + 8])
    if t == 0:
        sys.exit("no FDE header extension")
    if t == 0x0537BE77:
        a, l = struct.unpack(">QQ", d[off + 8:off + 24])
        open(sys.argv[2], "wb").write(d[a:a + l])
        break
    off += 8 + (n + 7) // 8 * 8
PYEOF
    # shellcheck disable=SC2086
    "$tool" "$d/l.qcow2" 16777216 "$d/area" $opts ||
        fail "luks layout: q2_create failed ($opts)"
    cmp "$d/q.qcow2" "$d/l.qcow2" ||
        fail "luks layout ($opts): differs from qemu-img create -o $qo"
    iopts=(--object secret,id=s0,data=secret123 --image-opts
           "driver=qcow2,file.filename=$d/l.qcow2,encrypt.key-secret=s0")
    # Preallocated clusters of an encrypted image read as garbage in
    # qemu too (zeros decrypted), so expect zeros only without.
    zcheck=(-c 'read -P 0 1M 1M')
    case $opts in *preallocation*) zcheck=() ;; esac
    for try in 1 2 3; do
        out=$(qemu-io "${iopts[@]}" -c 'write -P 0x61 100k 300k' \
                -c 'read -P 0x61 100k 300k' "${zcheck[@]}" 2>&1) &&
            ! echo "$out" | grep -qiE 'error|fail' && break
        [ $try -lt 3 ] || { echo "$out" >&2; fail "luks layout: qemu-io"; }
    done
    qemu-img check "${iopts[@]}" > "$d/check.out" 2>&1 ||
        { cat "$d/check.out" >&2; fail "luks layout: qemu-img check"; }
    echo "ok: luks layout ($opts) is qemu-img's; qemu-io and check with the secret"
done
