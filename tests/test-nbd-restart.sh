#!/usr/bin/env bash
# The NBD backing server goes away while the plugin runs: reads of
# unallocated clusters fail with EIO and a logged message, reads of
# allocated clusters (and writes to them) still work, the plugin keeps
# serving; once the server is back on the same socket, the next read
# reconnects and everything reads right again.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"
. "${srcdir:-${0%/*}}/nbd-lib.sh"

size=$((8*1024*1024))
base=$tmp/base.raw
gen_bytes "$size" random > "$base"
S=$tmp/base.sock
start_backing "$S" file "$base"

ov=$tmp/ov.qcow2
mkimg "$ov" "$size" -u -b "nbd+unix:///?socket=$S" -F raw
echo "write -P 85 0 1M" | qio "$ov"
ref_raw "$ov" "$tmp/exp.raw"

P=$tmp/plugin.sock
start_plugin "$P" -w "$ov" allow-remote-backing=true
puri="nbd+unix:///?socket=$P"

nbdcopy "$puri" "$tmp/got1.raw"
cmp -s "$tmp/exp.raw" "$tmp/got1.raw" || fail "first read differs"
echo "ok: read with the server up"

stop_backing "$S"
out=$(qemu-io -f raw "$puri" -c 'read -P 85 0 1M' -c 'write -P 86 4096 4096' \
      -c 'read -P 86 4096 4096' 2>&1) || fail "allocated clusters: $out"
if echo "$out" | grep -qiE 'fail|error'; then
    fail "allocated clusters while the server is down: $out"
fi
echo "ok: allocated clusters read and written while the server is down"
out=$(qemu-io -f raw "$puri" -c 'read 4M 64k' 2>&1) || true
echo "$out" | grep -qi 'Input/output error' ||
    fail "an unallocated read with the server down did not fail with EIO: $out"
grep -qi 'NBD server\|not connected\|reconnect' "$P.log" ||
    { cat "$P.log" >&2; fail "no message logged about the lost server"; }
echo "ok: unallocated read fails with EIO: $(grep -i -m1 'nbd' "$P.log")"
# Several failing requests in a row, and the plugin is still there.
out=$(qemu-io -f raw "$puri" -c 'read 2M 4k' -c 'read 6M 4k' 2>&1) || true
kill -0 "$plugin_pid" || fail "the plugin died"

start_backing "$S" file "$base"
cp "$tmp/exp.raw" "$tmp/exp2.raw"
printf '\126%.0s' $(seq 4096) | dd of="$tmp/exp2.raw" bs=4096 seek=1 conv=notrunc status=none
nbdcopy "$puri" "$tmp/got2.raw"
cmp -s "$tmp/exp2.raw" "$tmp/got2.raw" || { show_diff "$tmp/exp2.raw" "$tmp/got2.raw"; fail "after the restart: contents differ"; }
echo "ok: healed after the server came back"

# Killed with many requests in flight (the server delays every read):
# the reads that need it fail, the plugin neither hangs nor dies, and
# heals again.  The client waits for every reply (see nbd-inflight.py
# for why not nbdcopy).
stop_backing "$S"
start_backing "$S" --filter=delay file "$base" rdelay=500ms
r=0
/usr/bin/python3 "${srcdir:-${0%/*}}/nbd-inflight.py" "$puri" > "$tmp/inflight.out" 2>&1 &
copy_pid=$!
sleep 1
stop_backing "$S"
wait "$copy_pid" || r=$?
[ "$r" -ne 2 ] || fail "replies missing after the server died mid-flight: $(cat "$tmp/inflight.out")"
[ "$r" -eq 0 ] || fail "the in-flight client failed: $(cat "$tmp/inflight.out")"
read -r nok nfailed < "$tmp/inflight.out"
[ "$nfailed" -gt 0 ] || fail "no read failed although the server died mid-flight ($nok ok)"
kill -0 "$plugin_pid" || fail "the plugin died"
start_backing "$S" file "$base"
nbdcopy "$puri" "$tmp/got4.raw"
cmp -s "$tmp/exp2.raw" "$tmp/got4.raw" || fail "after a mid-flight kill and restart: contents differ"
echo "ok: server killed with $nok reads done and $nfailed in flight, which failed; healed"

# Restarted while idle, gracefully: on SIGTERM nbdkit answers
# ESHUTDOWN on connections that stay open and lingers while they do;
# the new server takes over the socket path at once.  The first request
# after it is a block status (extents of unallocated ranges go to the
# server), on a connection that has not been used since.
nbdinfo --map "$puri" > "$tmp/map1.txt" || fail "extents before the restart failed"
kill -TERM "$(cat "$S.pid")"
start_backing "$S" file "$base"
nbdinfo --map "$puri" > "$tmp/map2.txt" 2>"$tmp/map2.err" ||
    { cat "$tmp/map2.err" >&2; fail "extents right after a restart failed"; }
cmp -s "$tmp/map1.txt" "$tmp/map2.txt" || fail "extents differ after the restart"
echo "ok: extents right after a restart"
# The same for reads, on the reading connection.
kill -TERM "$(cat "$S.pid")"
start_backing "$S" file "$base"
nbdcopy "$puri" "$tmp/got5.raw" || fail "reads right after a graceful restart failed"
cmp -s "$tmp/exp2.raw" "$tmp/got5.raw" || fail "after a graceful restart: contents differ"
echo "ok: reads right after a graceful restart"
stop_plugin "$P"
qemu-img check -q "$ov" || fail "qemu-img check found problems"
echo "PASS"
