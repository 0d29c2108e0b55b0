#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# What must never be written: a file served with -r or only read; an
# image marked corrupt (served read-only); a dirty lazy-refcounts image
# (read-write connections refused, with the repair command); and
# metadata, even when a damaged L2 entry points guest data at it (the
# write fails, the metadata is intact, the corrupt bit is set).
source "${srcdir:-$(dirname "$0")}/write-lib.sh"
requires qemu-img qemu-io nbdkit nbdsh python3
patch="python3 ${srcdir:-$(dirname "$0")}/qcow2-patch.py"
img=$scratch/s.qcow2

fresh () {
  rm -f "$img"
  qemu-img create -q -f qcow2 "$@" "$img" 64M
  qemu-io -f qcow2 -c 'write -P 0x5a 0 4M' "$img" >/dev/null
}

# 1. -r, and a read-only session without -r, change nothing.
fresh
sum=$(sha256sum < "$img")
nbdkit -U - -r "$PLUGIN" file="$img" --run '
  nbdsh -u "$uri" -c "assert h.is_read_only()" \
        -c "
try:
    h.pwrite(b\"x\" * 512, 0)
    raise SystemExit(\"a write succeeded on a read-only export\")
except nbd.Error:
    pass"'
nbdkit -U - "$PLUGIN" file="$img" --run 'nbdcopy "$uri" /dev/null'
[ "$(sha256sum < "$img")" = "$sum" ] || { echo "reading modified the file"; exit 1; }
echo "ok: read-only serving left the file unchanged"

# 2. The corrupt bit: served read-only, with a warning.
fresh
$patch set-incompat "$img" 2
nbdkit -U - "$PLUGIN" file="$img" --run '
  nbdsh -u "$uri" -c "assert h.is_read_only()"' 2> "$scratch/log"
grep -q "corrupt" "$scratch/log" || { echo "no warning about the corrupt bit"; cat "$scratch/log"; exit 1; }
echo "ok: an image marked corrupt is served read-only"

# 3. A dirty image with lazy refcounts and repair=off: read-write
# connections refused.
fresh -o lazy_refcounts=on
$patch set-incompat "$img" 1
sum=$(sha256sum < "$img")
if nbdkit -U - "$PLUGIN" file="$img" repair=off --run 'nbdsh -u "$uri" -c "h.pwrite(b\"x\" * 512, 0)"' \
     2> "$scratch/log"; then
  echo "a write to a dirty image succeeded"; exit 1
fi
grep -q "qemu-img check -r all" "$scratch/log" ||
  { echo "the refusal does not say how to repair:"; cat "$scratch/log"; exit 1; }
nbdkit -U - -r "$PLUGIN" file="$img" --run 'nbdcopy "$uri" /dev/null'
[ "$(sha256sum < "$img")" = "$sum" ] || { echo "the dirty image was modified"; exit 1; }
echo "ok: a dirty image is refused read-write and served with -r"

# 4. Damaged L2 entries pointing guest clusters at metadata.
for target in l1_offset reftable_offset refblock0; do
  fresh
  eval "$($patch info "$img")"
  host=${!target}
  before=$($patch get "$img" "$host" 65536 | sha256sum)
  $patch set-l2 "$img" 1 "$host"
  if nbdkit -U - "$PLUGIN" file="$img" --run '
       nbdsh -u "$uri" -c "h.pwrite(b\"\\xee\" * 4096, 65536 + 512)"' \
       2> "$scratch/log"; then
    echo "a write through an L2 entry pointing at $target succeeded"; exit 1
  fi
  grep -q "holds metadata" "$scratch/log" ||
    { echo "no overlap message for $target:"; cat "$scratch/log"; exit 1; }
  after=$($patch get "$img" "$host" 65536 | sha256sum)
  [ "$before" = "$after" ] || { echo "$target was overwritten"; exit 1; }
  eval "$($patch info "$img")"
  [ $((incompat & 2)) -ne 0 ] || { echo "corrupt bit not set after the overlap"; exit 1; }
  # Other writes are refused from then on.
  if nbdkit -U - "$PLUGIN" file="$img" --run '
       nbdsh -u "$uri" -c "h.pwrite(b\"x\" * 512, 8 << 20)"' 2>/dev/null; then
    echo "writes continued after the image was marked corrupt"; exit 1
  fi
  echo "ok: a write aimed at $target failed, metadata intact, image marked corrupt"
done

# 5. Persistent bitmaps: we do not track dirty blocks, so the first
# write flags every bitmap in use; nothing leaks, nothing is lost.
fresh
qemu-img bitmap --add "$img" b0
qemu-img bitmap --add "$img" b1
nbdkit -U - "$PLUGIN" file="$img" --run '
  nbdsh -u "$uri" -c "h.pwrite(b\"\\x01\" * 65536, 32 << 20)"'
check_clean "$img"
n=$(qemu-img info --output=json "$img" |
    python3 -c 'import json,sys
bm = json.load(sys.stdin)["format-specific"]["data"].get("bitmaps", [])
print(sum("in-use" in b["flags"] for b in bm) if len(bm) == 2 else -1)')
[ "$n" = 2 ] || { echo "bitmaps not flagged in use after a write ($n)"; exit 1; }
echo "ok: bitmaps flagged in use by the first write, no leaks"

# 6. The first write clears unknown autoclear bits and keeps unknown
# header extensions.
fresh
$patch set-autoclear "$img" $((1 << 20))
$patch add-ext "$img" 0x7a7a0001 0123456789abcdef42
$patch exts "$img" > "$scratch/exts.before"
grep -q "^0x7a7a0001 0123456789abcdef42$" "$scratch/exts.before" ||
  { echo "the test could not add its extension"; exit 1; }
nbdkit -U - "$PLUGIN" file="$img" --run '
  nbdsh -u "$uri" -c "h.pwrite(b\"\\x02\" * 4096, 40 << 20)"'
check_clean "$img"
$patch exts "$img" > "$scratch/exts.after"
cmp -s "$scratch/exts.before" "$scratch/exts.after" ||
  { echo "header extensions changed:"; diff "$scratch/exts.before" "$scratch/exts.after"; exit 1; }
autoclear=$(python3 -c 'import struct,sys
f = open(sys.argv[1], "rb"); f.seek(88)
print(struct.unpack(">Q", f.read(8))[0])' "$img")
[ $((autoclear & (1 << 20))) -eq 0 ] ||
  { echo "unknown autoclear bit still set after a write"; exit 1; }
echo "ok: unknown autoclear bit cleared, unknown header extension kept"
