#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Zeroing and trimming: fast zero is honest (metadata-only on v3 for
# whole clusters, ENOTSUP otherwise); trimmed clusters are freed and
# reused; zero with MAY_TRIM releases clusters; lazy refcounts leave the
# dirty bit clear after a clean shutdown.
source "${srcdir:-$(dirname "$0")}/write-lib.sh"
requires qemu-img qemu-io nbdkit python3
python3 -c 'import nbd' 2>/dev/null || { echo "no python3-libnbd: skipped"; exit 77; }
img=$scratch/z.qcow2

# fast_zero VERSION: run fast-zero requests and check what succeeds.
fast_zero () {
  rm -f "$img"
  qemu-img create -q -f qcow2 -o "compat=$1" "$img" 64M
  qemu-io -f qcow2 -c 'write -P 0x77 0 8M' "$img" >/dev/null
  start_server "$img"
  python3 - "$uri" "$1" <<'PY'
import errno, nbd, sys
uri, compat = sys.argv[1], sys.argv[2]
h = nbd.NBD(); h.connect_uri(uri)
assert h.can_fast_zero(), "fast zero not advertised"
def fast(off, n):
    try:
        h.zero(n, off, nbd.CMD_FLAG_FAST_ZERO)
        return True
    except nbd.Error as e:
        assert e.errnum == errno.ENOTSUP, f"fast zero failed with {e}"
        return False
aligned = fast(1 << 20, 2 << 20)
unaligned = fast(4 << 20 | 512, 4096)
assert not unaligned, "an unaligned fast zero claimed to be fast"
assert aligned == (compat == "1.1"), f"aligned fast zero on {compat}: {aligned}"
if aligned:
    assert h.pread(2 << 20, 1 << 20) == bytes(2 << 20)
assert h.pread(1 << 20, 4 << 20) == b"\x77" * (1 << 20), "data beside it changed"
print(f"fast zero on compat={compat}: aligned={aligned}, unaligned refused")
PY
  stop_server
  check_clean "$img"
}
fast_zero 1.1
fast_zero 0.10

# Freed clusters are reused: trim everything written, flush, write as
# much again elsewhere; the file must not grow by the second write.
for opts in compat=1.1 compat=0.10 cluster_size=4096,refcount_bits=1; do
  rm -f "$img"
  qemu-img create -q -f qcow2 -o "$opts" "$img" 256M
  start_server "$img"
  python3 - "$uri" <<'PY'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pwrite(b"\x11" * (32 << 20), 0)
h.flush()
h.trim(32 << 20, 0)
h.flush()
assert h.pread(1 << 20, 0) == bytes(1 << 20), "trimmed data still reads back"
PY
  stop_server
  check_clean "$img"
  size1=$(stat -c %s "$img")
  start_server "$img"
  python3 - "$uri" <<'PY'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pwrite(b"\x22" * (32 << 20), 128 << 20)
h.flush()
PY
  stop_server
  check_clean "$img"
  size2=$(stat -c %s "$img")
  # New L2 tables may need a little room; 32 MiB of data must not.
  if [ "$size2" -gt $((size1 + (2 << 20))) ]; then
    echo "$opts: file grew from $size1 to $size2: freed clusters not reused"
    exit 1
  fi
  echo "ok: $opts reused freed clusters ($size1 -> $size2 bytes)"
done

# Zero with MAY_TRIM releases clusters; without it, v3 keeps them
# allocated as zero clusters.  Both read as zeros.
for trim in 0 1; do
  rm -f "$img"
  qemu-img create -q -f qcow2 "$img" 64M
  qemu-io -f qcow2 -c 'write -P 0x33 0 16M' "$img" >/dev/null
  start_server "$img"
  python3 - "$uri" "$trim" <<'PY'
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.zero(16 << 20, 0, nbd.CMD_FLAG_NO_HOLE if sys.argv[2] == "0" else 0)
assert h.pread(16 << 20, 0) == bytes(16 << 20)
PY
  stop_server
  check_clean "$img"
  alloc=$(qemu-img check --output=json "$img" |
          python3 -c 'import json,sys; print(json.load(sys.stdin).get("allocated-clusters", 0))')
  if [ "$trim" = 1 ] && [ "$alloc" -gt 8 ]; then
    echo "zero with MAY_TRIM left $alloc clusters allocated"; exit 1
  fi
  if [ "$trim" = 0 ] && [ "$alloc" -lt 256 ]; then
    echo "zero without MAY_TRIM released clusters ($alloc left)"; exit 1
  fi
  echo "ok: zero (may_trim=$trim): $alloc clusters allocated"
done

# Lazy refcounts: dirty while writing, clean after a clean shutdown.
rm -f "$img"
qemu-img create -q -f qcow2 -o lazy_refcounts=on "$img" 64M
start_server "$img"
python3 - "$uri" "$img" <<'PY'
import nbd, struct, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pwrite(b"\x44" * 65536, 0)
with open(sys.argv[2], "rb") as f:
    f.seek(72)
    assert struct.unpack(">Q", f.read(8))[0] & 1, "dirty bit not set while writing"
PY
stop_server
python3 - "$img" <<'PY'
import struct, sys
with open(sys.argv[1], "rb") as f:
    f.seek(72)
    assert not struct.unpack(">Q", f.read(8))[0] & 1, "dirty bit left set"
PY
check_clean "$img"
echo "ok: lazy refcounts: dirty bit set while writing, cleared at shutdown"
