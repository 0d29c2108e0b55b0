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
        cp "$tmp/ov1.qcow2" "$tmp/ovn.qcow2"
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

# A local image on NBD may not name a local backing file.
lmid=$tmp/lmid.qcow2
mkimg "$lmid" "$size" -b "$base" -F raw
L=$tmp/lmid.sock
start_backing "$L" file "$lmid"
ovl=$tmp/ovl.qcow2
mkimg "$ovl" "$size" -u -b "nbd+unix:///?socket=$L" -F qcow2
expect_refused 'local files named by remote images are never opened' \
    "$ovl" "$A"

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
expect_refused 'nbd_connect_uri.*(No such file|connect)' "$gone" \
    backing="nbd+unix:///?socket=$tmp/nobody.sock"
expect_refused 'nbd_connect_uri' "$tmp/ov2.qcow2" "$A" backing="nbd:unix:$tmp/nobody.sock"
# Malformed names found in an image fail cleanly too.
bad=$tmp/bad.qcow2
mkimg "$bad" "$size" -u -b 'json:{"file.driver":"nbd","file.path":' -F raw
expect_refused 'malformed json' "$bad" "$A"
bad2=$tmp/bad2.qcow2
mkimg "$bad2" "$size" -u -b 'json:{"file.driver":"file","file.filename":"/etc/passwd"}' -F raw
expect_refused 'only with the nbd driver' "$bad2" "$A"
echo "PASS"
