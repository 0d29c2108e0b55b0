#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The filter over other plugins and filters: the nbd plugin in front of a
# second nbdkit that exports the qcow2 file raw (reading and writing),
# the xz filter (read-only), a plugin below with a minimum block size
# that refuses unaligned requests, and read-only plugins below (writes
# fail with EROFS and the file does not change).  Also: images that
# name a backing or data file are refused unless the filter is told
# what to use.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"
requires nbdsh nbdinfo
: "${FILTER:?FILTER must be set to the path of nbdkit-qcow2-filter.so}"
test -f "$FILTER" || fail "filter $FILTER does not exist (build it first)"

# serve_raw SOCK [nbdkit args...]: a second nbdkit exporting a file raw.
serve_raw ()
{
    local sock=$1
    shift
    rm -f "$sock" "$sock.pid"
    nbdkit -U "$sock" -P "$sock.pid" "$@" 2>>"$tmp/raw-server.log" ||
        fail "could not start nbdkit $*"
    for _ in $(seq 100); do [ -s "$sock.pid" ] && break; sleep 0.05; done
    cleanup_fn kill "$(cat "$sock.pid")"
}

stop_raw ()
{
    local pid
    pid=$(cat "$1.pid")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.05; done
    fail "nbdkit on $1 did not exit"
}

# copy_through OUT NBDKIT-ARGS...: nbdcopy the export to OUT.
copy_through ()
{
    local out=$1
    shift
    rm -f "$out"
    timeout 120 nbdkit -U - "$@" --run 'nbdcopy "$uri" '"$out" \
        2>"$tmp/copy.log" || { cat "$tmp/copy.log" >&2; fail "serving $* failed"; }
}

# expect_erofs NBDKIT-ARGS...: the export must be read-only and a write
# sent anyway (libnbd's strict checks off) must fail in the server with
# EROFS, which reaches an NBD client as EPERM.
expect_erofs ()
{
    timeout 120 nbdkit -U - "$@" --run '
        /usr/bin/nbdsh -c "
import errno, os, sys
h.set_strict_mode(0)
h.connect_uri(\"$uri\")
assert h.is_read_only(), \"export is not read-only\"
try:
    h.pwrite(b\"X\" * 4096, 0)
    sys.exit(\"the write succeeded\")
except nbd.Error as e:
    assert e.errnum in (errno.EPERM, errno.EROFS), \"write failed with %s\" % e
print(\"write refused\")
"' >"$tmp/erofs.log" 2>&1 ||
        { cat "$tmp/erofs.log" >&2; fail "write through $* was not refused"; }
    grep -q "write request on readonly connection" "$tmp/erofs.log" ||
        { cat "$tmp/erofs.log" >&2; fail "write through $* was not refused with EROFS"; }
}

img=$tmp/disk.qcow2
mkimg "$img" 24M -o cluster_size=65536
random_fill "$img" 24M n=40
ref=$tmp/disk.raw
ref_raw "$img" "$ref"
assert_nonzero "$ref"

# ---- nbd plugin in front of a second nbdkit exporting the file raw ----
sock=$tmp/raw.sock
serve_raw "$sock" -r file "$img"
copy_through "$tmp/got.raw" -r --filter="$FILTER" nbd socket="$sock"
cmp "$ref" "$tmp/got.raw" || fail "read through the nbd plugin differs from qemu"
echo "ok: read through the nbd plugin"

# The remote export is read-only: the filter must be too.
before=$(sha "$img")
expect_erofs --filter="$FILTER" nbd socket="$sock"
stop_raw "$sock"
[ "$(sha "$img")" = "$before" ] || fail "a read-only nbd export below was modified"
echo "ok: read-only nbd plugin below: EROFS, file unchanged"

# Writing through the nbd plugin: the image needs room to grow inside
# the remote export, which cannot grow.
wimg=$tmp/w.qcow2
cp "$img" "$wimg"
truncate -s +32M "$wimg"
cp "$ref" "$tmp/w.raw"
rnd 1000; n0=$R
ops=$tmp/wops.txt
: > "$ops"
for (( i = 0; i < 30; i++ )); do
    rnd_range 1 64; len=$(( R * 4096 ))
    rnd $(( 24*1024*1024 - len )); off=$(( R / 512 * 512 ))
    rnd_pattern
    echo "write -P $R $off $len" >> "$ops"
done
echo "write -z 1M 300k" >> "$ops"
echo "discard 8M 1M" >> "$ops"
echo flush >> "$ops"
serve_raw "$sock" file "$wimg"
timeout 120 nbdkit -U - --filter="$FILTER" nbd socket="$sock" \
    --run 'qemu-io -f raw "$uri" < '"$ops"' > '"$tmp/wio.log" 2>&1 ||
    { cat "$tmp/wio.log" >&2; fail "writes through the nbd plugin failed"; }
grep -qiE 'error|failed' "$tmp/wio.log" && { cat "$tmp/wio.log" >&2; fail "qemu-io reported an error"; }
stop_raw "$sock"
qio "$tmp/w.raw" raw < "$ops"
qemu-img check -q "$wimg" || fail "qemu-img check after writes through the nbd plugin"
ref_raw "$wimg" "$tmp/w.got"
cmp "$tmp/w.raw" "$tmp/w.got" || fail "writes through the nbd plugin: content differs"
echo "ok: writes through the nbd plugin ($(wc -l < "$ops") ops), image clean"

# ---- the xz filter below (read-only) ----
if [ -f "$(nbdkit --dump-config | sed -n 's/^filterdir=//p')/nbdkit-xz-filter.so" ] &&
   command -v xz >/dev/null; then
    xz -k -T1 --block-size=1MiB -c "$img" > "$tmp/disk.qcow2.xz"
    copy_through "$tmp/got.raw" -r --filter="$FILTER" --filter=xz file "$tmp/disk.qcow2.xz"
    cmp "$ref" "$tmp/got.raw" || fail "read through the xz filter differs from qemu"
    echo "ok: read through the xz filter"
    before=$(sha "$tmp/disk.qcow2.xz")
    expect_erofs --filter="$FILTER" --filter=xz file "$tmp/disk.qcow2.xz"
    [ "$(sha "$tmp/disk.qcow2.xz")" = "$before" ] || fail "the xz file was modified"
    echo "ok: xz filter below: EROFS without -r, file unchanged"
else
    echo "skipped: no xz filter or no xz"
fi

# ---- a plugin below with a 4k minimum block size that fails any
# unaligned request: the filter's metadata I/O must align itself ----
bs=(--filter="$FILTER" --filter=blocksize-policy file)
bsargs=(blocksize-minimum=4096 blocksize-error-policy=error)
copy_through "$tmp/got.raw" -r "${bs[@]}" "$img" "${bsargs[@]}"
cmp "$ref" "$tmp/got.raw" || fail "read over a 4k-block plugin differs from qemu"
min=$(timeout 60 nbdkit -U - -r "${bs[@]}" "$img" "${bsargs[@]}" \
        --run 'nbdinfo --json "$uri"' | python3 -c '
import json, sys
print(json.load(sys.stdin)["exports"][0].get("block_size_minimum", 1))')
[ "$min" = 4096 ] || fail "the plugin's minimum block size was not passed up (got $min)"
cimg=$tmp/c.qcow2
mkimg "$cimg" 8M -o cluster_size=4096
random_fill "$cimg" 8M n=10
truncate -s +8M "$cimg"
ref_raw "$cimg" "$tmp/c.raw"
ops=$tmp/cops.txt
printf '%s\n' "write -P 7 4096 8192" "write -P 9 1M 64k" "write -z 2M 16k" \
    "write -P 5 7M 4096" "flush" > "$ops"
timeout 120 nbdkit -U - "${bs[@]}" "$cimg" "${bsargs[@]}" \
    --run 'qemu-io -f raw "$uri" < '"$ops"' > '"$tmp/cio.log" 2>&1 ||
    { cat "$tmp/cio.log" >&2; fail "writes over a 4k-block plugin failed"; }
grep -qiE 'error|failed' "$tmp/cio.log" && { cat "$tmp/cio.log" >&2; fail "qemu-io reported an error"; }
qio "$tmp/c.raw" raw < "$ops"
qemu-img check -q "$cimg" || fail "qemu-img check after writes over a 4k-block plugin"
ref_raw "$cimg" "$tmp/c.got"
cmp "$tmp/c.raw" "$tmp/c.got" || fail "writes over a 4k-block plugin: content differs"
echo "ok: read and write over a plugin with a 4k minimum block size"

# A plugin that takes at most 64k per request: the filter splits the
# 1M and larger reads and writes of its clients.
small=(--filter="$FILTER" --filter=blocksize-policy file)
smallargs=(blocksize-minimum=512 blocksize-maximum=65536 blocksize-error-policy=error)
copy_through "$tmp/got.raw" -r "${small[@]}" "$img" "${smallargs[@]}"
cmp "$ref" "$tmp/got.raw" || fail "read over a 64k-maximum plugin differs from qemu"
ref_raw "$cimg" "$tmp/c.raw"
printf '%s\n' "write -P 3 512k 3M" "write -P 4 100k 1k" "flush" > "$ops"
timeout 120 nbdkit -U - "${small[@]}" "$cimg" "${smallargs[@]}" \
    --run 'qemu-io -f raw "$uri" < '"$ops"' > '"$tmp/sio.log" 2>&1 ||
    { cat "$tmp/sio.log" >&2; fail "writes over a 64k-maximum plugin failed"; }
grep -qiE 'error|failed' "$tmp/sio.log" && { cat "$tmp/sio.log" >&2; fail "qemu-io reported an error"; }
qio "$tmp/c.raw" raw < "$ops"
qemu-img check -q "$cimg" || fail "qemu-img check after writes over a 64k-maximum plugin"
ref_raw "$cimg" "$tmp/c.got"
cmp "$tmp/c.raw" "$tmp/c.got" || fail "writes over a 64k-maximum plugin: content differs"
echo "ok: read and write over a plugin that takes at most 64k per request"

# ---- names inside the image are not followed ----
base=$tmp/base.qcow2
mkimg "$base" 8M
random_fill "$base" 8M n=10
top=$tmp/top.qcow2
mkimg "$top" 8M -b "$base" -F qcow2
random_fill "$top" 8M n=5 lo=1M hi=3M
log=$tmp/refused.log
if timeout 60 nbdkit -U - -r --filter="$FILTER" file "$top" \
       --run 'nbdinfo --size "$uri"' > "$log" 2>&1; then
    cat "$log" >&2; fail "an image naming a backing file was served"
fi
grep -q "qcow2-backing=PATH" "$log" && grep -q "qcow2-backing=none" "$log" ||
    { cat "$log" >&2; fail "the refusal does not say how to give the backing file"; }
echo "ok: backing file named in the image: refused ($(grep -m1 backing "$log"))"
ref_raw "$top" "$tmp/top.raw"
copy_through "$tmp/got.raw" -r --filter="$FILTER" file "$top" qcow2-backing="$base"
cmp "$tmp/top.raw" "$tmp/got.raw" || fail "qcow2-backing=PATH: differs from qemu"
cp "$top" "$tmp/alone.qcow2"
qemu-img rebase -q -u -b '' "$tmp/alone.qcow2"
ref_raw "$tmp/alone.qcow2" "$tmp/alone.raw"
copy_through "$tmp/got.raw" -r --filter="$FILTER" file "$top" qcow2-backing=none
cmp "$tmp/alone.raw" "$tmp/got.raw" || fail "qcow2-backing=none: differs from qemu"
echo "ok: qcow2-backing=PATH and qcow2-backing=none"

# A backing file on an NBD server, named in the image: followed only
# with qcow2-allow-remote-backing=true.
if nbdkit --filter="$FILTER" file --help 2>&1 | grep -q qcow2-allow-remote-backing; then
    bsock=$tmp/base.sock
    ref_raw "$base" "$tmp/nbase.raw"
    serve_raw "$bsock" -r file "$tmp/nbase.raw"
    nimg=$tmp/nbdtop.qcow2
    mkimg "$nimg" 8M -u -b "nbd+unix:///?socket=$bsock" -F raw
    random_fill "$nimg" 8M n=5 lo=2M hi=4M
    ref_raw "$nimg" "$tmp/nbdtop.raw"
    if timeout 60 nbdkit -U - -r --filter="$FILTER" file "$nimg" \
           --run 'nbdinfo --size "$uri"' > "$log" 2>&1; then
        cat "$log" >&2; fail "an image naming an NBD backing was followed without permission"
    fi
    grep -q "qcow2-allow-remote-backing=true" "$log" ||
        { cat "$log" >&2; fail "the refusal does not mention qcow2-allow-remote-backing=true"; }
    copy_through "$tmp/got.raw" -r --filter="$FILTER" file "$nimg" \
        qcow2-allow-remote-backing=true
    cmp "$tmp/nbdtop.raw" "$tmp/got.raw" || fail "NBD backing through the filter: differs from qemu"
    # A local backing name stays refused even with the permission.
    if timeout 60 nbdkit -U - -r --filter="$FILTER" file "$top" \
           qcow2-allow-remote-backing=true --run 'nbdinfo --size "$uri"' > "$log" 2>&1; then
        cat "$log" >&2; fail "a local backing name was followed with qcow2-allow-remote-backing=true"
    fi
    stop_raw "$bsock"
    echo "ok: NBD backing named in the image: refused, then followed with qcow2-allow-remote-backing=true"
fi

dimg=$tmp/df.qcow2
mkimg "$dimg" 8M -o data_file="$tmp/df.data"
random_fill "$dimg" 8M n=10
if timeout 60 nbdkit -U - -r --filter="$FILTER" file "$dimg" \
       --run 'nbdinfo --size "$uri"' > "$log" 2>&1; then
    cat "$log" >&2; fail "an image with an external data file was served"
fi
grep -q "qcow2-data-file=" "$log" ||
    { cat "$log" >&2; fail "the refusal does not say how to give the data file"; }
ref_raw "$dimg" "$tmp/df.raw"
copy_through "$tmp/got.raw" -r --filter="$FILTER" file "$dimg" qcow2-data-file="$tmp/df.data"
cmp "$tmp/df.raw" "$tmp/got.raw" || fail "qcow2-data-file=: differs from qemu"
echo "ok: external data file: refused, then read with qcow2-data-file="

# ---- parameters added to the plugin arrive with the qcow2- prefix ----
# -r: the plugin below is opened read-only too.
timeout 60 nbdkit -v -U - -r --filter="$FILTER" file "$img" --run true \
    > "$tmp/ro.log" 2>&1 || { cat "$tmp/ro.log" >&2; fail "nbdkit -r failed"; }
grep -q 'file: open readonly=1' "$tmp/ro.log" ||
    { grep 'open readonly' "$tmp/ro.log" >&2; fail "under -r the plugin below was not opened read-only"; }
echo "ok: -r opens the plugin below read-only"

# snapshot-create at startup, through the filter.  The filter opens the
# image when nbdkit starts serving, after the --run command has started:
# a connection waits for it.
simg=$tmp/snap.qcow2
cp "$img" "$simg"
truncate -s +4M "$simg"         # room for the snapshot's tables
timeout 60 nbdkit -U - --filter="$FILTER" file "$simg" qcow2-snapshot-create=viafilter \
    --run 'nbdinfo --size "$uri"' >/dev/null 2>"$tmp/snap.log" ||
    { cat "$tmp/snap.log" >&2; fail "qcow2-snapshot-create failed"; }
qemu-img snapshot -l "$simg" | grep -qw viafilter || fail "qcow2-snapshot-create made no snapshot"
qemu-img check -q "$simg" || fail "qemu-img check after qcow2-snapshot-create"
before=$(sha "$simg")
if timeout 60 nbdkit -U - -r --filter="$FILTER" file "$simg" qcow2-snapshot-delete=viafilter \
       --run 'nbdinfo --size "$uri"' >/dev/null 2>"$tmp/snap.log"; then
    fail "qcow2-snapshot-delete under -r was not refused"
fi
grep -q 'read-only' "$tmp/snap.log" ||
    { cat "$tmp/snap.log" >&2; fail "qcow2-snapshot-delete under -r: no clear error"; }
[ "$(sha "$simg")" = "$before" ] || fail "qcow2-snapshot-delete under -r changed the file"
echo "ok: qcow2-snapshot-create through the filter; refused under -r"

# compress=true: every write stored compressed.
zimg=$tmp/z.qcow2
mkimg "$zimg" 8M
truncate -s +16M "$zimg"
printf '%s\n' "write -P 1 0 1M" "write -P 2 3M 200k" "flush" > "$ops"
timeout 120 nbdkit -U - --filter="$FILTER" file "$zimg" qcow2-compress=true \
    --run 'qemu-io -f raw "$uri" < '"$ops"' > '"$tmp/zio.log" 2>&1 ||
    { cat "$tmp/zio.log" >&2; fail "compressed writes through the filter failed"; }
qemu-img check -q "$zimg" || fail "qemu-img check after compressed writes through the filter"
assert_compressed "$zimg"
truncate -s 8M "$tmp/z.raw"
qio "$tmp/z.raw" raw < "$ops"
ref_raw "$zimg" "$tmp/z.got"
cmp "$tmp/z.raw" "$tmp/z.got" || fail "compressed writes through the filter: content differs"
echo "ok: qcow2-compress=true"

# An encrypted image with qcow2-password=+FILE.
if nbdkit --filter="$FILTER" file --help 2>&1 | grep -q qcow2-password; then
    printf %s 'correct horse' > "$tmp/pw"
    sec=(--object "secret,id=s0,file=$tmp/pw")
    eimg=$tmp/enc.qcow2
    for try in 1 2 3 4 5 6; do
        qemu-img create -q -f qcow2 "${sec[@]}" \
            -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 \
            "$eimg" 8M 2>"$tmp/qi.err" && break
        grep -q 'accurate CPU usage' "$tmp/qi.err" || { cat "$tmp/qi.err" >&2; fail "qemu-img create (LUKS) failed"; }
    done
    truncate -s +16M "$eimg"
    printf '%s\n' "write -P 6 64k 100k" "write -P 8 5M 7000" "flush" > "$ops"
    timeout 120 nbdkit -U - --filter="$FILTER" file "$eimg" qcow2-password=+"$tmp/pw" \
        --run 'qemu-io -f raw "$uri" < '"$ops"' > '"$tmp/eio.log" 2>&1 ||
        { cat "$tmp/eio.log" >&2; fail "writes to an encrypted image through the filter failed"; }
    truncate -s 8M "$tmp/e.raw"
    qio "$tmp/e.raw" raw < "$ops"
    eopts="driver=qcow2,file.filename=$eimg,encrypt.key-secret=s0"
    qemu-img convert "${sec[@]}" --image-opts "$eopts" -O raw "$tmp/e.want" ||
        fail "qemu-img convert of the encrypted image failed"
    cmp "$tmp/e.raw" "$tmp/e.want" || fail "encrypted writes through the filter: qemu reads other data"
    copy_through "$tmp/got.raw" -r --filter="$FILTER" file "$eimg" qcow2-password=+"$tmp/pw"
    cmp "$tmp/e.raw" "$tmp/got.raw" || fail "encrypted read through the filter differs"
    qemu-img check "${sec[@]}" --image-opts "$eopts" >/dev/null ||
        fail "qemu-img check of the encrypted image"
    echo "ok: encrypted image with qcow2-password=+FILE, read and write"
else
    echo "skipped: this build has no password parameter"
fi

# The filter does not create images.
if nbdkit --filter="$FILTER" file --help 2>&1 | grep -q qcow2-create; then
    before=$(sha "$img")
    if timeout 60 nbdkit -U - --filter="$FILTER" file "$img" qcow2-create=true \
           qcow2-size=8M --run true > "$log" 2>&1; then
        cat "$log" >&2; fail "qcow2-create=true was accepted"
    fi
    grep -q "does not create" "$log" || { cat "$log" >&2; fail "qcow2-create=true: unclear refusal"; }
    [ "$(sha "$img")" = "$before" ] || fail "qcow2-create=true changed the file"
    echo "ok: qcow2-create=true refused"
fi
