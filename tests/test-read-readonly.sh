#!/usr/bin/env bash
# Reading never modifies any file: serve a variety of images with -r,
# and without -r when clients only read, and check that the image, its
# backing files and its data file keep their checksums and
# modification times.  With -r the export is read-only and writes fail.
# A dirty image (lazy refcounts, left unclean) is not repaired under -r.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"
requires_nbd_python nbdinfo

size=$((16*1024*1024))

# fingerprint FILES...: checksum and mtime of each file.
fingerprint ()
{
    local f
    for f in "$@"; do
        echo "$f $(sha "$f") $(stat -c %y "$f")"
    done
}

# only_read IMG [plugin args...]: copy, map and random-read IMG.
only_read ()
{
    local img=$1 w=
    shift
    if [ "$img" = -w ]; then w=-w; img=$1; shift; fi
    run_plugin $w "$img" "$@" -- 'nbdcopy "$uri" '"$tmp/ro.raw"' &&
        nbdinfo --map "$uri" >/dev/null &&
        /usr/bin/nbdsh -u "$uri" -c "
import random
r = random.Random(1)
for i in range(100):
    off = r.randrange(h.get_size() - 1)
    h.pread(min(70000, h.get_size() - off), off)
"' || fail "reading ${img##*/} failed"
    rm -f "$tmp/ro.raw"
}

# check_untouched FILES... -- IMG [plugin args...]
check_untouched ()
{
    local files=()
    while [ "$1" != -- ]; do files+=("$1"); shift; done
    shift
    local before after
    before=$(fingerprint "${files[@]}")
    sleep 0.01
    only_read "$@"
    after=$(fingerprint "${files[@]}")
    if [ "$before" != "$after" ]; then
        diff <(echo "$before") <(echo "$after") >&2 || true
        fail "serving $* modified a file"
    fi
    echo "ok: unchanged after $*"
}

# Images of many kinds.
mkimg "$tmp/plain.qcow2" "$size"
random_fill "$tmp/plain.qcow2" "$size" n=30
mkimg "$tmp/v2.qcow2" "$size" -o compat=0.10
random_fill "$tmp/v2.qcow2" "$size" n=30
mkimg "$tmp/lazy.qcow2" "$size" -o lazy_refcounts=on,refcount_bits=1
random_fill "$tmp/lazy.qcow2" "$size" n=30
mkimg "$tmp/ext.qcow2" "$size" -o extended_l2=on -b "$tmp/plain.qcow2" -F qcow2
random_fill "$tmp/ext.qcow2" "$size" n=30 align=2048 maxlen=64k
gen_bytes "$size" text > "$tmp/text.raw"
qemu-img convert -q -c -f raw -O qcow2 "$tmp/text.raw" "$tmp/comp.qcow2"
mkimg "$tmp/snap.qcow2" "$size"
random_fill "$tmp/snap.qcow2" "$size" n=20
qemu-img snapshot -c s1 "$tmp/snap.qcow2"
random_fill "$tmp/snap.qcow2" "$size" n=20
mkimg "$tmp/df.qcow2" "$size" -o data_file="$tmp/df.data"
random_fill "$tmp/df.qcow2" "$size" n=30
mkimg "$tmp/bitmaps.qcow2" "$size"
random_fill "$tmp/bitmaps.qcow2" "$size" n=10
qemu-img bitmap --add "$tmp/bitmaps.qcow2" b0
qemu-img bitmap --add --granularity 4096 "$tmp/bitmaps.qcow2" b1
random_fill "$tmp/bitmaps.qcow2" "$size" n=10
mkimg "$tmp/top.qcow2" "$size" -b "$tmp/ext.qcow2" -F qcow2
random_fill "$tmp/top.qcow2" "$size" n=10

for w in "" -w; do
    for i in plain v2 lazy comp snap bitmaps; do
        check_untouched "$tmp/$i.qcow2" -- $w "$tmp/$i.qcow2"
    done
    check_untouched "$tmp/df.qcow2" "$tmp/df.data" -- $w "$tmp/df.qcow2"
    check_untouched "$tmp/top.qcow2" "$tmp/ext.qcow2" "$tmp/plain.qcow2" -- \
        $w "$tmp/top.qcow2"
    check_untouched "$tmp/top.qcow2" "$tmp/plain.qcow2" -- \
        $w "$tmp/top.qcow2" backing="$tmp/plain.qcow2"
done
check_untouched "$tmp/snap.qcow2" -- "$tmp/snap.qcow2" snapshot=s1

# With -r the export is read-only and a write is rejected.
before=$(fingerprint "$tmp/plain.qcow2")
run_plugin "$tmp/plain.qcow2" -- /usr/bin/nbdsh -u '"$uri"' -c "'
assert h.is_read_only(), \"export is not read-only\"
try:
    h.pwrite(b\"Z\" * 4096, 0)
    raise SystemExit(\"a write succeeded on a -r export\")
except nbd.Error:
    pass
'" || fail "-r export accepted a write or was not read-only"
[ "$(fingerprint "$tmp/plain.qcow2")" = "$before" ] ||
    fail "write attempt on the -r export changed the file"
echo "ok: -r export is read-only"

qemu-img info "$tmp/bitmaps.qcow2" | grep -q 'name: b1' ||
    fail "sanity: persistent bitmaps were lost"

# A dirty image: lazy refcounts on, qemu-io stopped without closing
# the image (its abort command), so the dirty bit stays set.  Under -r
# the plugin must read it without repairing it.
dirty=$tmp/dirty.qcow2
mkimg "$dirty" "$size" -o lazy_refcounts=on
rnd_pattern
( qemu-io -f qcow2 -c "write -P $R 0 1M" -c "write -P 7 5M 64k" -c abort \
    "$dirty" || true ) >/dev/null 2>&1
# incompatible_features (header offset 72), bit 0: dirty.
/usr/bin/python3 -c '
import struct, sys
d = open(sys.argv[1], "rb").read(80)
sys.exit(0 if struct.unpack(">Q", d[72:80])[0] & 1 else 1)' "$dirty" ||
    fail "sanity: $dirty does not have the dirty bit set"
check_untouched "$dirty" -- "$dirty"
ref_raw "$dirty" "$tmp/dirty.raw" -U
compare_read --expect "$tmp/dirty.raw" "$dirty"
