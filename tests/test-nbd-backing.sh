#!/usr/bin/env bash
# Backing files on NBD servers: overlays whose backing is exported by
# nbdkit on a Unix socket, named as a URI, in the legacy nbd:unix: form
# and in both json: forms; qcow2 over NBD (a qcow2 file exported raw),
# also as the middle of a chain whose bottom is again on NBD; reads and
# extents compared with qemu (which follows the NBD backing itself);
# the refusal without allow-remote-backing=true; an unreachable server;
# backing= naming a URI over an image whose recorded backing is gone.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"
. "${srcdir:-${0%/*}}/nbd-lib.sh"
requires qemu-nbd

size=$((24*1024*1024))

# Raw base with a hole at the end, served by nbdkit file.
base=$tmp/base.raw
gen_bytes "$size" random > "$base"
truncate -s $(( size + 8*1024*1024 )) "$base"
vsize=$(( size + 8*1024*1024 ))
S=$tmp/base.sock
start_backing "$S" file "$base"
A=allow-remote-backing=true

uri="nbd+unix:///?socket=$S"
legacy="nbd:unix:$S"
flat="json:{\"file.driver\":\"nbd\",\"file.path\":\"$S\"}"
nested="json:{\"file\":{\"driver\":\"nbd\",\"server\":{\"type\":\"unix\",\"path\":\"$S\"}}}"

i=0
for name in "$uri" "$legacy" "$flat" "$nested"; do
    i=$(( i + 1 ))
    ov=$tmp/ov$i.qcow2
    mkimg "$ov" "$vsize" -u -b "$name" -F raw
    random_fill "$ov" "$vsize" n=25 zeroes=20 discards=15
    ref_raw "$ov" "$tmp/ref$i.raw"
    compare_read --expect "$tmp/ref$i.raw" "$ov" "$A"
    # Without the permission: refused, naming both ways out.
    expect_refused 'allow-remote-backing=true.*backing=' "$ov"
done
compare_map "$tmp/ov1.qcow2" "$A"
compare_map "$tmp/ov3.qcow2" "$A"

# A json: name may carry the format too ("driver" beside "file"): it
# must agree with the recorded format or backing-format=.
jraw="json:{\"driver\":\"raw\",\"file\":{\"driver\":\"nbd\",\"server\":{\"type\":\"unix\",\"path\":\"$S\"}}}"
ovj=$tmp/ovj.qcow2
mkimg "$ovj" "$vsize" -u -b "$jraw" -F raw
random_fill "$ovj" "$vsize" n=10 zeroes=5 discards=5
ref_raw "$ovj" "$tmp/refj.raw"
compare_read --expect "$tmp/refj.raw" "$ovj" "$A"
expect_refused "says format 'raw'.*given for it is 'qcow2'" "$ovj" "$A" \
    backing-format=qcow2
ovj2=$tmp/ovj2.qcow2
mkimg "$ovj2" "$vsize" -u -b "$jraw" -F qcow2
expect_refused "says format 'raw'.*given for it is 'qcow2'" "$ovj2" "$A"
echo "ok: json: names with a format"

# nbdkit sparse-random as the backing server: holes and data, which
# the extents must pass through as qemu-nbd sees them.
SR=$tmp/sparse.sock
rnd 1000000
start_backing "$SR" sparse-random "$size" seed=$R percent=30
ovs=$tmp/ovs.qcow2
mkimg "$ovs" "$size" -u -b "nbd+unix:///?socket=$SR" -F raw
random_fill "$ovs" "$size" n=15 zeroes=20 discards=10
ref_raw "$ovs" "$tmp/refs.raw"
compare_read --expect "$tmp/refs.raw" "$ovs" "$A"
compare_map "$ovs" "$A"

# TCP: a server on 127.0.0.1 at a random free port, named as a URI, in
# the legacy form and as nested json with server.host/port.
port=
for try in 1 2 3 4 5; do
    rnd 20000; p=$(( 40000 + R ))
    if nbdkit -i 127.0.0.1 -p "$p" -P "$tmp/tcp.pid" file "$base" 2>/dev/null; then
        port=$p; break
    fi
done
if [ -n "$port" ]; then
    cleanup_fn kill "$(cat "$tmp/tcp.pid")"
    for name in "nbd://127.0.0.1:$port/" "nbd:127.0.0.1:$port" \
        "json:{\"file\":{\"driver\":\"nbd\",\"server\":{\"type\":\"inet\",\"host\":\"127.0.0.1\",\"port\":\"$port\"}}}"; do
        compare_read --expect "$tmp/ref1.raw" "$tmp/ov1.qcow2" backing="$name"
    done
    kill "$(cat "$tmp/tcp.pid")"
else
    echo "note: no free TCP port found; TCP forms not tested"
fi

# Export names (with a space and a slash, percent-encoded in the URI),
# checked strictly by the server.
X=$tmp/export.sock
start_backing "$X" --filter=exportname file "$base" exportname="a b/c" \
    exportname-strict=true
for name in "nbd:unix:$X:exportname=a b/c" \
    "json:{\"file.driver\":\"nbd\",\"file.path\":\"$X\",\"file.export\":\"a b/c\"}" \
    "nbd+unix:///a%20b%2Fc?socket=$X"; do
    compare_read --expect "$tmp/ref1.raw" "$tmp/ov1.qcow2" backing="$name"
done
expect_refused "no export named 'wrong'" "$tmp/ov1.qcow2" \
    backing="nbd:unix:$X:exportname=wrong"
stop_backing "$X"

# The filter (over nbdkit file) follows an NBD name in the image only
# with qcow2-allow-remote-backing=true: unlike a path, it means the
# same on every machine.
if [ -n "${FILTER:-}" ] && [ -f "$FILTER" ] && [ "$QCOW2_MODE" = plugin ]; then
    nbdkit -U - -r --filter="$FILTER" file "$tmp/ov1.qcow2" \
        qcow2-allow-remote-backing=true \
        --run 'nbdcopy "$uri" '"$tmp/gotf.raw" 2>"$tmp/filter.log" ||
        { cat "$tmp/filter.log" >&2; fail "the filter could not serve ov1"; }
    cmp -s "$tmp/ref1.raw" "$tmp/gotf.raw" ||
        fail "the filter read ov1 differently from qemu"
    r=0
    nbdkit -U - -r --filter="$FILTER" file "$tmp/ov1.qcow2" \
        --run 'nbdinfo --size "$uri"' >"$tmp/filter.log" 2>&1 || r=$?
    [ "$r" -ne 0 ] && grep -q 'qcow2-allow-remote-backing=true.*qcow2-backing=' \
        "$tmp/filter.log" ||
        { cat "$tmp/filter.log" >&2; fail "the filter did not refuse ov1 as it should"; }
    echo "ok: the filter follows NBD names only with qcow2-allow-remote-backing=true"
fi

# Servers that differ: no multi-conn (one connection, requests in
# flight), multi-conn advertised but only one client allowed (we must
# fall back to one connection), and no base:allocation (extents say
# data, as qemu's do).  Same overlay as ov1, its backing name overridden.
for variant in "multi-conn multi-conn-mode=disable" "limit limit=1" "noextents"; do
    V=$tmp/variant.sock
    start_backing "$V" --filter=${variant%% *} file "$base" \
        $( [ "${variant#* }" != "$variant" ] && echo "${variant#* }" )
    compare_read --expect "$tmp/ref1.raw" "$tmp/ov1.qcow2" \
        backing="nbd+unix:///?socket=$V"
    if [ "$variant" = noextents ]; then
        # No holes in the copy: qemu reports data clusters over holes
        # in the image file as zero, the plugin as data.
        cp --sparse=never "$tmp/ov1.qcow2" "$tmp/ovn.qcow2"
        qemu-img rebase -u -f qcow2 -b "nbd+unix:///?socket=$V" -F raw \
            "$tmp/ovn.qcow2"
        compare_map "$tmp/ovn.qcow2" "$A"
    fi
    stop_backing "$V"
done

# Every combination of the HOLE and ZERO flags from the server (the
# extentlist filter says what we like) must pass through as qemu-nbd
# passes it.
printf '%s\n' "0 1M zero" "2M 1M hole,zero" "4M 1M hole" "6M 1M" \
    "9M 3M zero" > "$tmp/extents.txt"
E=$tmp/extents.sock
start_backing "$E" --filter=extentlist file "$base" extentlist="$tmp/extents.txt"
ove=$tmp/ove.qcow2
mkimg "$ove" "$vsize" -u -b "nbd+unix:///?socket=$E" -F raw
echo "write -P 5 5M 64k" | qio "$ove"
echo "write -P 6 9M 4k" | qio "$ove"
compare_map "$ove" "$A"

# A server that takes the first client but leaves every later one
# hanging before the handshake (while advertising multi-conn): the spare
# connection times out and the reads go on over the first.
ST=$tmp/stall.sock
/usr/bin/python3 "$srcdir/nbd-stall.py" "$ST" "$S" &
stall_pid=$!
cleanup_fn kill "$stall_pid"
for (( i = 0; i < 100; i++ )); do [ -S "$ST" ] && break; sleep 0.1; done
compare_read --expect "$tmp/ref1.raw" "$tmp/ov1.qcow2" \
    backing="nbd+unix:///?socket=$ST"
kill "$stall_pid"

# qcow2 over NBD: a qcow2 file exported raw by nbdkit file.
qb=$tmp/qbase.qcow2
mkimg "$qb" "$size" -o cluster_size=16384
random_fill "$qb" "$size" n=30 zeroes=10 discards=0
Q=$tmp/qbase.sock
start_backing "$Q" file "$qb"
ovq=$tmp/ovq.qcow2
mkimg "$ovq" "$size" -u -b "nbd+unix:///?socket=$Q" -F qcow2
random_fill "$ovq" "$size" n=20 zeroes=10 discards=10
ref_raw "$ovq" "$tmp/refq.raw"
compare_read --expect "$tmp/refq.raw" "$ovq" "$A"
compare_map "$ovq" "$A"

# The same, with nbdkit forking into the background after the image
# (and so the qcow2 header over NBD) was opened: the connection made
# before the fork must serve the child.
PB=$tmp/plugin-bg.sock
start_backing "$PB" -r "$PLUGIN" file="$ovq" "$A"
nbdcopy "nbd+unix:///?socket=$PB" "$tmp/gotbg.raw"
cmp -s "$tmp/refq.raw" "$tmp/gotbg.raw" ||
    fail "qcow2 over NBD through a backgrounded nbdkit: contents differ"
stop_backing "$PB"
echo "ok: read ovq.qcow2 through a forked nbdkit"

# Depth 3 over two servers: top (local) -> mid (qcow2, on NBD) -> base
# (raw, on NBD, named inside mid in the legacy form).
mid=$tmp/mid.qcow2
mkimg "$mid" "$vsize" -u -b "$legacy" -F raw -o cluster_size=65536
random_fill "$mid" "$vsize" n=20 zeroes=20 discards=10
M=$tmp/mid.sock
start_backing "$M" file "$mid"
top=$tmp/top.qcow2
mkimg "$top" "$vsize" -u -b "nbd:unix:$M" -F qcow2 -o cluster_size=4096
random_fill "$top" "$vsize" n=20 zeroes=10 discards=10
ref_raw "$top" "$tmp/reftop.raw"
compare_read --expect "$tmp/reftop.raw" "$top" "$A"
compare_map "$top" "$A"
# backing= is followed without the permission, but the NBD name that
# the image it names records is not.
compare_read --expect "$tmp/reftop.raw" "$top" "$A" backing="nbd:unix:$M" \
    backing-format=qcow2
expect_refused 'allow-remote-backing=true' "$top" backing="nbd:unix:$M" \
    backing-format=qcow2

# A local image on NBD may not name a local backing file.
lmid=$tmp/lmid.qcow2
mkimg "$lmid" "$size" -b "$base" -F raw
L=$tmp/lmid.sock
start_backing "$L" file "$lmid"
ovl=$tmp/ovl.qcow2
mkimg "$ovl" "$size" -u -b "nbd+unix:///?socket=$L" -F qcow2
expect_refused 'local files named by remote images are never opened' \
    "$ovl" "$A"

# Nor a local external data file.
dmid=$tmp/dmid.qcow2
mkimg "$dmid" "$size" -o data_file="$tmp/dmid.data"
D=$tmp/dmid.sock
start_backing "$D" file "$dmid"
ovd=$tmp/ovd.qcow2
mkimg "$ovd" "$size" -u -b "nbd+unix:///?socket=$D" -F qcow2
expect_refused 'local data file.*never opened' "$ovd" "$A"

# backing= over an image whose recorded backing does not exist: always
# allowed, no allow-remote-backing needed.  The reference is a copy
# rebased (unsafe) onto the same URI, read by qemu.
gone=$tmp/gone.qcow2
mkimg "$tmp/gone-ref.qcow2" "$vsize" -u -b "$uri" -F raw
random_fill "$tmp/gone-ref.qcow2" "$vsize" n=15
cp "$tmp/gone-ref.qcow2" "$gone"
qemu-img rebase -u -f qcow2 -b "$tmp/does-not-exist.raw" -F raw "$gone"
ref_raw "$tmp/gone-ref.qcow2" "$tmp/refgone.raw"
compare_read --expect "$tmp/refgone.raw" "$gone" backing="$uri"
compare_read --expect "$tmp/refgone.raw" "$gone" backing="$legacy"
compare_read --expect "$tmp/refgone.raw" "$gone" backing="$nested"

# An unreachable server fails startup with libnbd's message.
expect_refused 'nbd_(aio_)?connect_uri.*(No such file|connect)' "$gone" \
    backing="nbd+unix:///?socket=$tmp/nobody.sock"
expect_refused 'nbd_(aio_)?connect_uri' "$tmp/ov2.qcow2" "$A" backing="nbd:unix:$tmp/nobody.sock"
# Malformed names found in an image fail cleanly too.
bad=$tmp/bad.qcow2
mkimg "$bad" "$size" -u -b 'json:{"file.driver":"nbd","file.path":' -F raw
expect_refused 'malformed json' "$bad" "$A"
bad2=$tmp/bad2.qcow2
mkimg "$bad2" "$size" -u -b 'json:{"file.driver":"file","file.filename":"/etc/passwd"}' -F raw
expect_refused 'only with the nbd driver' "$bad2" "$A"
echo "PASS"
