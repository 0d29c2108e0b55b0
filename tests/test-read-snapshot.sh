#!/usr/bin/env bash
# Internal snapshots (qemu-img snapshot -c): snapshot=NAME and
# snapshot=ID export that snapshot's data, compared with
# qemu-img convert -l; the active layer is unaffected; a snapshot
# export is read-only and leaves the file untouched; a snapshot taken
# before the image grew has the old size; unknown snapshots are
# refused.  Includes an image whose snapshot table is the last thing in
# the file (as qemu-img snapshot -c leaves it).
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"
requires_nbd_python

# snap_id IMG NAME: the ID qemu gave to snapshot NAME.
snap_id ()
{
    qemu-img snapshot -l "$1" |
        awk -v n="$2" '$1 ~ /^[0-9]+$/ && $2 == n { print $1; exit }'
}

# check_snapshot IMG NAME REF: snapshot=NAME and snapshot=ID read REF.
check_snapshot ()
{
    local img=$1 name=$2 ref=$3 id
    id=$(snap_id "$img" "$name")
    [ -n "$id" ] || fail "sanity: no ID for snapshot $name"
    compare_read --expect "$ref" "$img" snapshot="$name"
    compare_read --expect "$ref" "$img" snapshot="$id"
}

# snap_ref IMG NAME OUT: the snapshot's data according to qemu-img
# convert -l, checked against the same by ID.
snap_ref ()
{
    local img=$1 name=$2 out=$3 id
    id=$(snap_id "$img" "$name")
    ref_raw "$img" "$out" -l snapshot.name="$name"
    ref_raw "$img" "$out.byid" -l snapshot.id="$id"
    cmp -s "$out" "$out.byid" ||
        fail "sanity: qemu gives different data by name and ID"
    rm -f "$out.byid"
}

# table_ends_file IMG: true if IMG's snapshot table is the last thing
# in the file and its last entry is not padded to a multiple of 8.
table_ends_file ()
{
    /usr/bin/python3 - "$1" <<'PYEOF'
import os, struct, sys
path = sys.argv[1]
d = open(path, "rb").read()
nb, off = struct.unpack(">IQ", d[60:72])
for i in range(nb):
    off = (off + 7) & ~7
    extra, = struct.unpack(">I", d[off + 36:off + 40])
    id_len, name_len = struct.unpack(">HH", d[off + 12:off + 16])
    off += 40 + extra + id_len + name_len
sys.exit(0 if off == os.path.getsize(path) and off % 8 != 0 else 1)
PYEOF
}

size=$((16*1024*1024))
n=0
for opts in compat=1.1,cluster_size=65536 compat=0.10,cluster_size=4096 \
            compat=1.1,cluster_size=16384,extended_l2=on \
            compat=1.1,cluster_size=512,refcount_bits=2; do
    n=$(( n + 1 ))
    echo "--- $opts"
    # Two snapshots with writes between and after them.
    img=$tmp/snap$n.qcow2
    mkimg "$img" "$size" -o "$opts"
    random_fill "$img" "$size" n=30
    qemu-img snapshot -c first "$img"
    random_fill "$img" "$size" n=30
    qemu-img snapshot -c second "$img"
    random_fill "$img" "$size" n=20
    for name in first second; do
        snap_ref "$img" $name "$tmp/$name.raw"
        check_snapshot "$img" $name "$tmp/$name.raw"
    done
    cmp -s "$tmp/first.raw" "$tmp/second.raw" &&
        fail "sanity: the two snapshots have the same data"
    # The active layer is still what qemu says it is.
    compare_read "$img"
    ref_raw "$img" "$tmp/active.raw"
    cmp -s "$tmp/active.raw" "$tmp/second.raw" &&
        fail "sanity: active layer equals the second snapshot"
    compare_map "$img"

    # Serving a snapshot without -r: either refused, or served
    # read-only; writes must fail and the file must not change.
    before=$(sha "$img")
    r=0
    serve_args "$img" snapshot=first
    timeout 120 nbdkit -U - "${SERVE[@]}" --run '
        /usr/bin/nbdsh -u "$uri" -c "
import sys
ro = h.is_read_only()
try:
    h.pwrite(b\"X\" * 512, 0)
    wrote = True
except nbd.Error:
    wrote = False
print(\"read_only=%s write_succeeded=%s\" % (ro, wrote))
sys.exit(1 if wrote else 0)
"' > "$tmp/snap-rw.log" 2>&1 || r=$?
    cat "$tmp/snap-rw.log"
    if [ $r -ne 0 ] && ! grep -qiE 'snapshot|read-only|readonly' "$tmp/snap-rw.log"; then
        fail "snapshot export without -r: a write succeeded or it failed unclearly"
    fi
    [ "$(sha "$img")" = "$before" ] ||
        fail "serving snapshot=first without -r modified the image"

    expect_refused 'nosuch' "$img" snapshot=nosuch
    expect_refused 'snapshot' "$img" snapshot=99

    # The snapshot table is the last thing in the file: the last entry
    # is not padded to 8 bytes there.
    # (No discards before it, so that qemu has no freed cluster to put
    # the table in; the layout is checked below.)
    last=$tmp/snap-last$n.qcow2
    mkimg "$last" "$size" -o "$opts"
    random_fill "$last" "$size" n=20 zeroes=0 discards=0
    qemu-img snapshot -c only "$last"
    table_ends_file "$last" ||
        fail "sanity: the snapshot table of $last is not unpadded at the end of the file"
    snap_ref "$last" only "$tmp/only.raw"
    compare_read "$last"
    check_snapshot "$last" only "$tmp/only.raw"

    # A snapshot taken before the image grew keeps its own, smaller
    # size.  qemu-img convert -l shows it at the current size, so the
    # reference is a copy with the snapshot applied (qemu-img snapshot
    # -a), whose first bytes must agree with convert -l.
    if [ "${opts#compat=0.10}" = "$opts" ]; then
        grown=$tmp/snap-grown$n.qcow2
        mkimg "$grown" "$size" -o "$opts"
        random_fill "$grown" "$size" n=20
        qemu-img snapshot -c small "$grown"
        qemu-img resize -q "$grown" $(( size + 4*1024*1024 ))
        rnd_pattern; echo "write -P $R $size 1M" | qio "$grown"
        cp "$grown" "$tmp/applied.qcow2"
        qemu-img snapshot -a small "$tmp/applied.qcow2"
        ref_raw "$tmp/applied.qcow2" "$tmp/small.raw"
        [ "$(stat -c %s "$tmp/small.raw")" = "$size" ] ||
            fail "sanity: applied snapshot is not $size bytes"
        snap_ref "$grown" small "$tmp/small-l.raw"
        cmp -s -n "$size" "$tmp/small.raw" "$tmp/small-l.raw" ||
            fail "sanity: snapshot -a and convert -l disagree"
        check_snapshot "$grown" small "$tmp/small.raw"
        compare_read "$grown"
    fi
    rm -f "$tmp"/*.raw
done
