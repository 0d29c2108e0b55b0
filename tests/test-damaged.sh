#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# Damaged images, in the manner of QEMU's iotests 060/080 and of
# CVE-2014-0143..0147: good images made by qemu-img and qemu-io are
# patched by make-damaged.py (bad header fields, table sizes and
# offsets, reserved bits, entries pointing past EOF or into metadata,
# bad compressed descriptors, bad header extensions and backing names).
# For each one, serving it through the plugin must either
#   - fail at open, with a message naming the file, or
#   - fail the read of the damaged area, while a read elsewhere on the
#     same connection still works, or (for damage a reader need not see)
#   - just not crash;
# and never crash, hang, trip a sanitizer or modify the image.  Then
# every image that can be served is written to (at the damaged offset
# and elsewhere): the writes may fail, but guest data must never land
# in a metadata cluster.

[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -u
export LC_ALL=C

progname=${0##*/}
srcdir=${srcdir:-${0%/*}}

fail () { echo "$progname: FAIL: $*" >&2; exit 1; }
skip () { echo "$progname: SKIP: $*" >&2; exit 77; }

: "${PLUGIN:?PLUGIN must be set to the path of nbdkit-qcow2-plugin.so}"
test -f "$PLUGIN" || fail "plugin $PLUGIN does not exist (build it first)"
for c in nbdkit qemu-img qemu-io python3 timeout cmp; do
    command -v "$c" >/dev/null 2>&1 || skip "$c not installed"
done
python3 -c 'import nbd' 2>/dev/null || skip "python3 nbd module not installed"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/nbdkit-qcow2-damaged.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/src" "$tmp/d"

# ---- the good images ----

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

# probe.py MODE URI OFFSET LENGTH GOOD: the client side of each case.
#   read:    the read at OFFSET must fail, then GOOD must read back
#   nocrash: try everything, require nothing but a live server
#   good:    OFFSET must read back as byte LENGTH (base image check)
cat > "$tmp/probe.py" <<'EOF'
import sys
import nbd

mode, uri = sys.argv[1], sys.argv[2]
off, length, good = (int(x) for x in sys.argv[3:6])
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()


def try_status(o, n):
    try:
        h.block_status(n, o, lambda *a: 0)
    except nbd.Error:
        pass


if mode == "good":
    buf = h.pread(4096, off)
    if buf != bytes([length]) * 4096:
        sys.exit("base image: wrong data at %d" % off)
    h.shutdown()
    sys.exit(0)

if mode == "write":
    # Guest data at the damaged offset: it may fail, but must never
    # land in metadata (checked on the file afterwards).
    for o in (off, good):
        try:
            h.pwrite(b"\xee" * 4096, o)
        except nbd.Error as e:
            print("write at %d failed: %s" % (o, e.string))
    try:
        h.flush()
    except nbd.Error:
        pass
    h.shutdown()
    sys.exit(0)

if mode == "read":
    try:
        h.pread(length, off)
    except nbd.Error as e:
        print("read at %d failed as expected: %s" % (off, e.string))
    else:
        sys.exit("FAIL: reading %d bytes at %d of a damaged image "
                 "succeeded" % (length, off))
    try_status(off, min(65536, size - off))
    # The server survives: a read elsewhere, on the same connection.
    h.pread(4096, good)
    h.pread(4096, good)
    print("read at %d still works" % good)
    h.shutdown()
    sys.exit(0)

# nocrash: read the damaged area, the whole disk, and its status.
for o, n in ((off, length), (0, 512)):
    try:
        h.pread(n, o)
    except nbd.Error:
        pass
o, step = 0, 256 * 1024
while o < size:
    n = min(step, size - o)
    try:
        h.pread(n, o)
    except nbd.Error:
        pass
    try_status(o, n)
    o += n
h.pread(512, good)              # the connection is still alive
h.shutdown()
print("no crash")
EOF

# run_plugin LOG IMG ARGS -- COMMAND...: serve IMG, return the status.
run_plugin ()
{
    local log=$1 img=$2 args=()
    shift 2
    while [ "$1" != -- ]; do args+=("$1"); shift; done
    shift
    timeout 120 nbdkit -U - "$PLUGIN" file="$img" "${args[@]}" \
        --run "$*" >"$log" 2>&1
}

# no_crash STATUS LOG WHAT
no_crash ()
{
    if [ "$1" -ge 124 ] ||
       grep -qE 'AddressSanitizer|LeakSanitizer|runtime error|Assertion|Segmentation fault|core dumped' "$2"; then
        cat "$2" >&2
        fail "$3: crashed or hung (status $1)"
    fi
}

# The good images must serve their data, or the cases prove nothing.
for img in v2 v3 comp snap extl2; do
    specs="0:17 4194304:34"
    [ $img != snap ] || specs="0:51 4096:17 4194304:34"
    for spec in $specs; do
        r=0
        run_plugin "$tmp/log" "$tmp/src/$img.qcow2" -- \
            python3 "$tmp/probe.py" good '"$uri"' "${spec%:*}" "${spec#*:}" 0 ||
            r=$?
        [ $r -eq 0 ] || { cat "$tmp/log" >&2; fail "good image $img.qcow2 does not serve"; }
    done
done
r=0
run_plugin "$tmp/log" "$tmp/src/overlay.qcow2" -- \
    python3 "$tmp/probe.py" good '"$uri"' 0 17 0 || r=$?
[ $r -eq 0 ] || { cat "$tmp/log" >&2; fail "good overlay.qcow2 does not serve"; }
echo "ok: the good images serve their data"

# ---- the damaged images ----

/usr/bin/env python3 "$srcdir/make-damaged.py" "$tmp/src" "$tmp/d" > "$tmp/manifest" ||
    fail "make-damaged.py failed"
cp "$tmp/src/base.qcow2" "$tmp/d/"
n=$(wc -l < "$tmp/manifest")
[ "$n" -ge 100 ] || fail "make-damaged.py made only $n images"

nopen=0 nread=0 nnocrash=0 nwrite=0
while IFS=$'\t' read -r name kind off len good pat args; do
    img=$tmp/d/$name
    log=$tmp/d/$name.log
    plugin_args=()
    [ "$args" = - ] || plugin_args=($args)
    before=$(cksum < "$img")
    r=0
    case $kind in
        open)
            run_plugin "$log" "$img" "${plugin_args[@]}" -- \
                nbdcopy '"$uri"' /dev/null || r=$?
            no_crash $r "$log" "$name"
            if [ $r -eq 0 ]; then
                cat "$log" >&2
                fail "$name: served, but it should have been refused"
            fi
            grep -qF "$name" "$log" ||
                { cat "$log" >&2; fail "$name: the error does not name the file"; }
            nopen=$((nopen + 1))
            ;;
        read)
            run_plugin "$log" "$img" "${plugin_args[@]}" -- \
                python3 "$tmp/probe.py" read '"$uri"' "$off" "$len" "$good" ||
                r=$?
            no_crash $r "$log" "$name"
            if [ $r -ne 0 ]; then
                cat "$log" >&2
                fail "$name: expected the read at $off to fail and the server to go on"
            fi
            grep -q "error.*$name" "$log" ||
                { cat "$log" >&2; fail "$name: the read error does not name the file"; }
            nread=$((nread + 1))
            ;;
        nocrash)
            run_plugin "$log" "$img" "${plugin_args[@]}" -- \
                python3 "$tmp/probe.py" nocrash '"$uri"' "$off" "$len" "$good" ||
                r=$?
            no_crash $r "$log" "$name"
            # Refusing at open is fine; a server that dies midway is not.
            if [ $r -ne 0 ] && grep -q Traceback "$log"; then
                cat "$log" >&2
                fail "$name: the server stopped answering"
            fi
            nnocrash=$((nnocrash + 1))
            ;;
        *) fail "manifest: unknown kind $kind" ;;
    esac
    if [ "$pat" != - ] && ! grep -qiE -- "$pat" "$log"; then
        cat "$log" >&2
        fail "$name: the error does not mention '$pat'"
    fi
    [ "$(cksum < "$img")" = "$before" ] || fail "$name: reading modified the image"
    msg=$(grep -m1 -i 'error' "$log" | sed 's/^nbdkit: [^ ]* //')
    echo "ok: $name ($kind${msg:+: $msg})"

    # Writes, where the image can be served: guest data written at the
    # damaged offset and elsewhere must never land in metadata.
    if [ "$kind" != open ]; then
        r=0
        run_plugin "$log.w" "$img" "${plugin_args[@]}" -- \
            python3 "$tmp/probe.py" write '"$uri"' "$off" "$len" "$good" ||
            r=$?
        no_crash $r "$log.w" "$name (write)"
        python3 "$srcdir/make-damaged.py" --metadata-clean "$img" 0xee ||
            { cat "$log.w" >&2; fail "$name: a write reached metadata"; }
        msg=$(grep -m1 -i 'error' "$log.w" | sed 's/^nbdkit: [^ ]* //')
        echo "ok: $name (write${msg:+: $msg})"
        nwrite=$((nwrite + 1))
    fi
done < "$tmp/manifest"

echo "$progname: $nopen refused at open, $nread failed reads, $nnocrash no-crash cases, $nwrite write probes: all passed"
