#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# compress=true: rewriting compressed clusters releases their space.
#  - Six full rewrites of a text disk (different text each time, with
#    a flush between them) must not grow the file much past two copies'
#    worth, and leave no leaks after a clean shutdown.
#  - Unaligned rewrites over compressed data read-modify-write whole
#    clusters: content equal to the same writes on a raw file.
#  - Trimming everything leaves no data and no leaks.
#  - compress=true is refused, with a clear message, for an image with
#    an external data file and for an encrypted image.
# After the rewrites the plugin's own check (repair=check) must agree
# with qemu-img check: no errors, no leaks.
source "${srcdir:-$(dirname "$0")}/write-lib.sh"
source "${srcdir:-$(dirname "$0")}/compress-lib.sh"
requires qemu-img qemu-io nbdkit nbdcopy python3
pick_seed

img=$scratch/r.qcow2
size=$((8 << 20))
qemu-img create -q -f qcow2 "$img" $size
start_server "$img" compress=true
for round in 1 2 3 4 5 6; do
  python3 "$srcdir/compress-disk.py" "$scratch/in.raw" $size $size \
    $((seed + round)) >/dev/null
  nbdcopy --flush "$scratch/in.raw" "$uri"
  fsize=$(stat -c %s "$img")
  [ "$round" -eq 1 ] && first=$fsize
  echo "round $round: file $fsize bytes"
done
stop_server
check_clean "$img"
own_check "$img"
qemu-img compare -q -f raw -F qcow2 "$scratch/in.raw" "$img" ||
  { echo "content differs after the rewrites"; exit 1; }
[ "$fsize" -le $((2 * first + (1 << 20))) ] ||
  { echo "the file grew from $first to $fsize bytes: space not reused"; exit 1; }

# Unaligned writes over compressed clusters, and the same on raw.
cp "$scratch/in.raw" "$scratch/ref.raw"
cmds=()
RANDOM=$seed
for i in $(seq 40); do
  off=$(( (RANDOM * 32768 + RANDOM) % (size - 300000) ))
  len=$(( RANDOM * 8 % 200000 + 1 ))
  cmds+=(-c "write -P $((i % 250 + 1)) $off $len")
done
start_server "$img" compress=true
qemu-io -f raw "$uri" "${cmds[@]}" >/dev/null
stop_server
qemu-io -f raw "$scratch/ref.raw" "${cmds[@]}" >/dev/null
check_clean "$img"
own_check "$img"
qemu-img compare -q -f raw -F qcow2 "$scratch/ref.raw" "$img" ||
  { echo "content differs after unaligned rewrites"; exit 1; }
echo "unaligned rewrites: equal, clean"

# Trim everything: no data left, nothing leaked.
start_server "$img" compress=true
qemu-io -f raw "$uri" -c "discard 0 $size" >/dev/null
stop_server
check_clean "$img"
read -r cbytes pbytes < <(map_bytes "$img" | sed 's/[a-z]*=//g')
[ "$cbytes" -eq 0 ] && [ "$pbytes" -eq 0 ] ||
  { echo "after trimming: $cbytes compressed, $pbytes other data bytes"; exit 1; }
echo "trim: no data left, clean"

# Refusals: the server must not start, and must say why.
refused () {
  local img=$1 want=$2; shift 2
  local sum
  sum=$(md5sum < "$img")
  if nbdkit -U - "$PLUGIN" "file=$img" compress=true "$@" --run true \
       2>"$scratch/err"; then
    echo "compress=true was accepted for $img"; exit 1
  fi
  grep -Eq "$want" "$scratch/err" ||
    { echo "unclear refusal:"; cat "$scratch/err"; exit 1; }
  [ "$(md5sum < "$img")" = "$sum" ] || { echo "$img was modified"; exit 1; }
  echo "refused: $(head -1 "$scratch/err")"
}
qemu-img create -q -f qcow2 -o data_file="$scratch/d.raw" "$scratch/df.qcow2" 16M
refused "$scratch/df.qcow2" "compress=true.*external data file"
qemu-img create -q -f qcow2 --object secret,id=s0,data=pw \
  -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 \
  "$scratch/enc.qcow2" 16M 2>/dev/null ||
  qemu-img create -q -f qcow2 --object secret,id=s0,data=pw \
    -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 \
    "$scratch/enc.qcow2" 16M
refused "$scratch/enc.qcow2" "compress=true.*encrypted" password=pw
