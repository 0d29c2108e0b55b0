#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The virt-v2v -oo compressed pipeline without qemu-img: the plugin
# creates the image (create=true) and stores every write compressed
# (compress=true) while nbdcopy fills it with a mixed raw disk.
# qemu-img compare must find it identical to the source, qemu-img check
# clean with compressed clusters, qemu-img info must show the options,
# and the file must be no bigger than qemu-img convert -c makes it
# (within 5%).
source "${srcdir:-$(dirname "$0")}/write-lib.sh"
source "${srcdir:-$(dirname "$0")}/compress-lib.sh"
requires qemu-img nbdkit nbdcopy python3
pick_seed

# plugin create options | the same for qemu-img convert | cluster size
cases=(
  "cluster-size=64K                         cluster_size=65536              65536"
  "cluster-size=4K,compression-type=zstd    cluster_size=4096,compression_type=zstd 4096"
  "cluster-size=2M,extended-l2=true         cluster_size=2097152,extended_l2=on 2097152"
)
size=$((24 << 20))
raw=$scratch/in.raw
python3 "$srcdir/compress-disk.py" "$raw" $size $((2 << 20)) "$seed"

for c in "${cases[@]}"; do
  read -r popts qopts cs <<<"$c"
  img=$scratch/new.qcow2 ref=$scratch/ref.qcow2
  rm -f "$img" "$ref"
  # shellcheck disable=SC2086
  start_server "$img" create=true size=$size ${popts//,/ } compress=true
  nbdcopy --flush "$raw" "$uri"
  stop_server
  qemu-img compare -q -f raw -F qcow2 "$raw" "$img" ||
    { echo "$popts: the copy differs from the source"; exit 1; }
  n=$(compressed_clusters "$img")
  info=$(qemu-img info --output=json "$img")
  got_cs=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["cluster-size"])' "$info")
  [ "$got_cs" = "$cs" ] || { echo "$popts: cluster size $got_cs"; exit 1; }
  case $popts in
    *zstd*) grep -q '"compression-type": "zstd"' <<<"$info" ||
              { echo "$popts: not zstd: $info"; exit 1; } ;;
  esac
  qemu-img convert -c -O qcow2 -o "$qopts" "$raw" "$ref"
  fsize=$(stat -c %s "$img") rsize=$(stat -c %s "$ref")
  echo "$popts: $n compressed clusters; file $fsize bytes (qemu-img convert -c: $rsize)"
  [ "$n" -gt 0 ] || { echo "no compressed clusters"; exit 1; }
  [ "$fsize" -le $((rsize * 105 / 100 + 2 * cs)) ] ||
    { echo "file is $fsize bytes, qemu-img makes $rsize"; exit 1; }
done
