#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# snapshot-create=, snapshot-apply=, snapshot-delete= against qemu-img
# snapshot -c/-a/-d on copies of the same image: the active layer, each
# snapshot (qemu-img convert -l), the snapshot list (IDs, names, VM
# state size, disk size from the extra data; dates differ) and
# qemu-img check (no errors, no leaks) must agree.  Image kinds: v3,
# v2, extended L2, compressed clusters, a backing file, 512 B and 2 MiB
# clusters.  Also: writes after a create copy away from the snapshot;
# deleting the snapshot the active layer came from; several operations
# in one run as an offline tool (--run true); a snapshot taken before a
# resize; errors (missing snapshot, duplicate name, -r, snapshot=,
# refcount_bits=1) fail startup and leave the file unchanged.
# SNAP_PART=2 (test-snapshot-kinds.sh) runs the compressed, backing,
# 512 B and 2 MiB kinds instead.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"
requires qemu-img
requires qemu-io
requires python3

# ops IMG ARGS...: run snapshot operations through the plugin, offline.
ops ()
{
    local img=$1
    shift
    _plugin_seq=$(( _plugin_seq + 1 ))
    local log=$tmp/ops.$_plugin_seq.log r=0
    timeout 300 nbdkit -U - "$PLUGIN" file="$img" "$@" --run true \
        2>"$log" || r=$?
    if [ $r -ne 0 ]; then
        cat "$log" >&2
        fail "nbdkit $img $* --run true exited $r"
    fi
}

# qsnap IMG ARGS...: the same with qemu-img snapshot.
qsnap ()
{
    qemu-img snapshot "$@" || fail "qemu-img snapshot $* failed"
}

# list IMG: the snapshot list without dates and clocks, plus each
# entry's disk size and l1 size validity read from the table itself.
list ()
{
    qemu-img snapshot -l "$1" | awk 'NR > 2 { print $1, $2, $3, $4, $NF }'
    python3 - "$1" <<'EOF'
import struct, sys
d = open(sys.argv[1], 'rb').read()
n, off = struct.unpack('>IQ', d[60:72])
for i in range(n):
    l1o, l1s, idl, nl, ds, dn, vc, vs, ex = struct.unpack('>QIHHIIQII', d[off:off+40])
    extra = d[off+40:off+40+ex]
    disk = struct.unpack('>Q', extra[8:16])[0] if ex >= 16 else None
    name = d[off+40+ex+idl:off+40+ex+idl+nl].decode()
    print('entry', name, 'extra', ex, 'disk_size', disk, 'vm_state', vs)
    off += (40 + ex + idl + nl + 7) & ~7
EOF
}

# check IMG: qemu-img check reports neither errors nor leaks.
check ()
{
    local r=0
    qemu-img check "$1" > "$tmp/check.out" 2>&1 || r=$?
    if [ $r -ne 0 ]; then
        cat "$tmp/check.out" >&2
        fail "qemu-img check $1 exited $r"
    fi
}

# same A Q WHAT [SNAPSHOT...]: the plugin's copy A and qemu-img's copy Q
# agree: active layer, the named snapshots, list and check.
same ()
{
    local a=$1 q=$2 what=$3 s
    shift 3
    check "$a"
    check "$q"
    ref_raw "$q" "$tmp/q.raw"
    ref_raw "$a" "$tmp/a.raw"
    cmp -s "$tmp/q.raw" "$tmp/a.raw" || {
        show_diff "$tmp/q.raw" "$tmp/a.raw"
        fail "$what: the active layer differs from qemu-img's"
    }
    for s in "$@"; do
        ref_raw "$q" "$tmp/q.raw" -l snapshot.name="$s"
        ref_raw "$a" "$tmp/a.raw" -l snapshot.name="$s"
        cmp -s "$tmp/q.raw" "$tmp/a.raw" ||
            fail "$what: snapshot $s differs from qemu-img's"
    done
    list "$q" > "$tmp/q.list"
    list "$a" > "$tmp/a.list"
    diff -u "$tmp/q.list" "$tmp/a.list" >&2 ||
        fail "$what: the snapshot list differs from qemu-img's"
    echo "ok: $what ($(grep -c '^entry' "$tmp/a.list") snapshots)"
}

# writes OPSFILE: seeded qemu-io writes over SIZE bytes.
gen_writes ()
{
    local size=$1 out=$2 i off len
    : > "$out"
    for (( i = 0; i < 12; i++ )); do
        rnd $(( size / 512 - 256 )); off=$(( R * 512 ))
        rnd_range 1 256; len=$(( R * 512 ))
        rnd_pattern
        echo "write -P $R $off $len" >> "$out"
    done
    echo "write -z 0 65536" >> "$out"
}

# plugin_writes IMG OPSFILE: the same writes through the plugin.
plugin_writes ()
{
    local img=$1 opsf=$2
    run_plugin -w "$img" -- \
        "qemu-io -f raw \"\$uri\" < '$opsf' > '$tmp/qio.out' 2>&1" ||
        fail "writing through the plugin failed"
    if grep -qiE 'error|failed' "$tmp/qio.out"; then
        cat "$tmp/qio.out" >&2
        fail "qemu-io through the plugin reported an error"
    fi
}

# one_kind NAME SIZE MAKE-COMMAND...: the whole sequence on one image.
one_kind ()
{
    local name=$1 size=$2
    shift 2
    local base=$tmp/$name.base.qcow2 a=$tmp/$name.a.qcow2 q=$tmp/$name.q.qcow2
    local bytes
    bytes=$(to_bytes "$size")
    "$@" "$base" "$size"
    ref_raw "$base" "$tmp/start.raw"
    assert_nonzero "$tmp/start.raw"
    cp "$base" "$a"
    cp "$base" "$q"

    # Create, then the same writes on both: the snapshot keeps the start.
    ops "$a" snapshot-create=s1
    qsnap -c s1 "$q"
    same "$a" "$q" "$name: create" s1
    gen_writes "$bytes" "$tmp/w1.txt"
    plugin_writes "$a" "$tmp/w1.txt"
    qio "$q" < "$tmp/w1.txt"
    same "$a" "$q" "$name: writes after create" s1
    ref_raw "$a" "$tmp/s1.raw" -l snapshot.name=s1
    cmp -s "$tmp/s1.raw" "$tmp/start.raw" ||
        fail "$name: snapshot s1 changed under writes"
    ref_raw "$a" "$tmp/after.raw"
    cmp -s "$tmp/after.raw" "$tmp/start.raw" &&
        fail "sanity: $name: the writes changed nothing"

    # A second snapshot, apply the first, delete the first (the one the
    # active layer came from), then write again.
    ops "$a" snapshot-create=s2
    qsnap -c s2 "$q"
    ops "$a" snapshot-apply=s1
    qsnap -a s1 "$q"
    same "$a" "$q" "$name: apply" s1 s2
    ref_raw "$a" "$tmp/x.raw"
    cmp -s "$tmp/x.raw" "$tmp/start.raw" ||
        fail "$name: apply did not bring back the start"
    ops "$a" snapshot-delete=s1
    qsnap -d s1 "$q"
    same "$a" "$q" "$name: delete the applied snapshot" s2
    gen_writes "$bytes" "$tmp/w2.txt"
    plugin_writes "$a" "$tmp/w2.txt"
    qio "$q" < "$tmp/w2.txt"
    same "$a" "$q" "$name: writes after delete" s2

    # Several operations in one offline run, by name and by ID.
    local id2
    id2=$(qemu-img snapshot -l "$a" | awk '$2 == "s2" { print $1 }')
    ops "$a" snapshot-create=s3 snapshot-delete="$id2" snapshot-create=s4 \
        snapshot-apply=s3 snapshot-delete=s4
    qsnap -c s3 "$q"
    qsnap -d s2 "$q"
    qsnap -c s4 "$q"
    qsnap -a s3 "$q"
    qsnap -d s4 "$q"
    same "$a" "$q" "$name: five operations in one run" s3
    ops "$a" snapshot-delete=s3
    qsnap -d s3 "$q"
    same "$a" "$q" "$name: delete the last snapshot"
}

make_v3 () { mkimg "$1" "$2"; random_fill "$1" "$2" n=25; }
make_v2 () { mkimg "$1" "$2" -o compat=0.10; random_fill "$1" "$2" n=25; }
make_extl2 ()
{
    mkimg "$1" "$2" -o extended_l2=on,cluster_size=65536
    random_fill "$1" "$2" n=25 align=2048
}
make_c512 ()
{
    mkimg "$1" "$2" -o cluster_size=512
    random_fill "$1" "$2" n=25 maxlen=64k
}
make_c2m () { mkimg "$1" "$2" -o cluster_size=2M; random_fill "$1" "$2" n=15; }
make_compressed ()
{
    mkimg "$1.src" "$2"
    random_fill "$1.src" "$2" n=25 zeroes=0 discards=0
    qemu-img convert -q -c -O qcow2 "$1.src" "$1" ||
        fail "qemu-img convert -c failed"
    assert_compressed "$1"
}
make_backing ()
{
    mkimg "$1.back" "$2"
    random_fill "$1.back" "$2" n=20
    qemu-img create -q -f qcow2 -b "$1.back" -F qcow2 "$1" ||
        fail "cannot create the overlay"
    random_fill "$1" "$2" n=15
}

# Split in two for time: test-snapshot-kinds.sh runs the second part.
if [ "${SNAP_PART:-1}" = 2 ]; then
    one_kind compressed 16M make_compressed
    one_kind backing 16M make_backing
    one_kind c512 8M make_c512
    one_kind c2m 16M make_c2m
    echo "$progname: all passed (part 2)"
    exit 0
fi
one_kind v3 16M make_v3
one_kind v2 16M make_v2
one_kind extl2 16M make_extl2

# Create and serve in one process: the clients' writes copy away from
# the snapshot taken at startup.
a=$tmp/live.a.qcow2 q=$tmp/live.q.qcow2
make_v3 "$a" 16M
cp "$a" "$q"
ref_raw "$a" "$tmp/live.start.raw"
gen_writes $((16 << 20)) "$tmp/w3.txt"
run_plugin -w "$a" snapshot-create=live -- \
    "qemu-io -f raw \"\$uri\" < '$tmp/w3.txt' > '$tmp/qio.out' 2>&1" ||
    fail "serving with snapshot-create=live failed"
grep -qiE 'error|failed' "$tmp/qio.out" && fail "qemu-io reported an error"
qsnap -c live "$q"
qio "$q" < "$tmp/w3.txt"
same "$a" "$q" "create at startup, then serve and write" live
ref_raw "$a" "$tmp/live.raw" -l snapshot.name=live
cmp -s "$tmp/live.raw" "$tmp/live.start.raw" ||
    fail "the snapshot taken at startup changed under the writes"

# A snapshot taken before a resize: applying it brings the size back.
a=$tmp/resize.a.qcow2 q=$tmp/resize.q.qcow2
make_v3 "$a" 8M
cp "$a" "$q"
ops "$a" snapshot-create=small
qsnap -c small "$q"
qemu-img resize -q "$a" 24M
qemu-img resize -q "$q" 24M
ops "$a" snapshot-apply=small
qsnap -a small "$q"
same "$a" "$q" "resize: apply a smaller snapshot" small
[ "$(qemu-img info --output=json "$a" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')" = $((8 << 20)) ] ||
    fail "resize: apply did not restore the 8M size"

# Errors: startup fails, and the file is unchanged.
e=$tmp/err.qcow2
make_v3 "$e" 8M
qsnap -c one "$e"
cp "$e" "$tmp/err.orig"
# refused PATTERN ARGS...: nbdkit must fail with PATTERN, file unchanged.
refused ()
{
    local pat=$1 r=0
    shift
    timeout 120 nbdkit -U - "$@" --run true > "$tmp/refused.log" 2>&1 ||
        r=$?
    [ $r -ne 0 ] || fail "expected failure of nbdkit $*"
    [ $r -lt 124 ] || { cat "$tmp/refused.log" >&2; fail "nbdkit $* ended with $r"; }
    grep -qiE -- "$pat" "$tmp/refused.log" || {
        cat "$tmp/refused.log" >&2
        fail "nbdkit $* did not say '$pat'"
    }
    cmp -s "$e" "$tmp/err.orig" || fail "nbdkit $* changed the file"
    echo "ok: refused $* ($(grep -iE -m1 -- "$pat" "$tmp/refused.log"))"
}
refused "no snapshot with that ID or name" "$PLUGIN" "$e" snapshot-apply=nope
refused "no snapshot with that ID or name" "$PLUGIN" "$e" snapshot-delete=7
refused "no snapshot with that ID or name" "$PLUGIN" "$e" \
    snapshot-create=two snapshot-delete=one snapshot-apply=one
refused "exists" "$PLUGIN" "$e" snapshot-create=one
refused "exists" "$PLUGIN" "$e" snapshot-create=x snapshot-create=x
refused "read-only \(-r\)" -r "$PLUGIN" "$e" snapshot-create=two
refused "read-only \(-r\)" "$PLUGIN" "$e" snapshot-delete=one --readonly
refused "read-only \(-r\)" -fr "$PLUGIN" "$e" snapshot-apply=one
refused "cannot be combined" "$PLUGIN" "$e" snapshot=one snapshot-create=two
refused "must not be empty" "$PLUGIN" "$e" snapshot-create=
# -r inside a --run command is not nbdkit's -r: this one must work.
cp "$e" "$tmp/run-r.qcow2"
timeout 120 nbdkit -U - "$PLUGIN" "$tmp/run-r.qcow2" snapshot-create=two \
    --run 'echo -r >/dev/null' || fail "a --run command with -r was refused"
qemu-img snapshot -l "$tmp/run-r.qcow2" | grep -q ' two ' ||
    fail "snapshot-create=two with --run 'echo -r' did nothing"
# An external data file: no internal snapshots (qemu-img refuses too).
mkimg "$e" 8M -o data_file="$tmp/err.data"
random_fill "$e" 8M n=5
cp "$e" "$tmp/err.orig"
refused "external data file" "$PLUGIN" "$e" snapshot-create=x
# A dirty image (lazy refcounts, not closed): refused until repaired.
mkimg "$e" 8M -o lazy_refcounts=on
random_fill "$e" 8M n=5
python3 - "$e" <<'PYEOF'
import struct, sys
with open(sys.argv[1], 'r+b') as f:
    f.seek(72)
    v = struct.unpack('>Q', f.read(8))[0]
    f.seek(72)
    f.write(struct.pack('>Q', v | 1))
PYEOF
cp "$e" "$tmp/err.orig"
# (With repair on open, repair=off keeps the refusal.)
norepair=()
nbdkit "$PLUGIN" --help 2>/dev/null | grep -q 'repair=' && norepair=(repair=off)
refused "dirty" "$PLUGIN" "$e" "${norepair[@]}" snapshot-create=x
# One-bit refcounts cannot count a second reference (qemu-img fails too).
mkimg "$e" 8M -o refcount_bits=1
random_fill "$e" 8M n=5
cp "$e" "$tmp/err.orig"
refused "refcount" "$PLUGIN" "$e" snapshot-create=x
# The same with a persistent bitmap: the refusal must come before the
# first write flags the bitmap in use (which would lose it for qemu).
qemu-img bitmap --add "$e" b0 || fail "qemu-img bitmap --add failed"
cp "$e" "$tmp/err.orig"
refused "refcount" "$PLUGIN" "$e" snapshot-create=x
qemu-img info "$e" | grep -q in-use && fail "the bitmap was left in use"
echo "$progname: all passed"
