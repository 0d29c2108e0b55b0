#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# compress=true: nbdcopy a mixed raw disk (text, random, zeros, holes)
# into an empty qcow2 made by qemu-img, for several cluster sizes and
# both compression types.  qemu-img compare must find the images
# identical and qemu-img check must find them clean; qemu-img map must
# show every text cluster compressed and every random one stored
# uncompressed, and the file must be no bigger than qemu-img convert -c
# makes it (within 5%).  The server must advertise the cluster size as
# the preferred block size.
source "${srcdir:-$(dirname "$0")}/write-lib.sh"
source "${srcdir:-$(dirname "$0")}/compress-lib.sh"
requires qemu-img nbdkit nbdcopy python3
pick_seed

# opts  virtual size  unit of the mixed content
cases=(
  "cluster_size=65536                                  32M 1M"
  "cluster_size=65536,compression_type=zstd            32M 1M"
  "cluster_size=4096                                   16M 256K"
  "cluster_size=4096,compression_type=zstd             16M 256K"
  "cluster_size=2097152,compression_type=zstd          32M 4M"
  "cluster_size=2097152                                16M 2M"
  "cluster_size=65536,extended_l2=on                   16M 512K"
  "cluster_size=512,compat=0.10                        2M 64K"
  "cluster_size=65536,refcount_bits=1                  8M 256K"
  "cluster_size=65536,refcount_bits=2                  8M 256K"
  "cluster_size=65536                                  8195K 1M"
)

to_bytes () {
  python3 -c 'import sys
s = sys.argv[1]; m = {"K": 1 << 10, "M": 1 << 20}
print(int(s[:-1]) * m[s[-1]] if s[-1] in m else int(s))' "$1"
}

for c in "${cases[@]}"; do
  read -r opts size unit <<<"$c"
  size=$(to_bytes "$size"); unit=$(to_bytes "$unit")
  raw=$scratch/in.raw img=$scratch/out.qcow2 ref=$scratch/ref.qcow2
  rm -f "$raw" "$img" "$ref"
  counts=$(python3 "$srcdir/compress-disk.py" "$raw" "$size" "$unit" "$seed")
  eval "$counts"
  qemu-img create -q -f qcow2 -o "$opts" "$img" "$size"
  cs=$(qemu-img info --output=json "$img" |
       python3 -c 'import json,sys; print(json.load(sys.stdin)["cluster-size"])')

  start_server "$img" compress=true
  # The cluster size is the preferred block size (nbdinfo is libnbd's).
  if command -v nbdinfo >/dev/null; then
    bs=$(nbdinfo --json "$uri" | python3 -c 'import json, sys
j = json.load(sys.stdin)["exports"][0]
print(j.get("block_size_minimum"), j.get("block_size_preferred"))')
    [ "$bs" = "1 $cs" ] ||
      { echo "$opts: block sizes (minimum, preferred) are $bs, not 1 $cs"; exit 1; }
  fi
  nbdcopy --flush "$raw" "$uri"
  stop_server

  qemu-img compare -q -f raw -F qcow2 "$raw" "$img" ||
    { echo "$opts: the copy differs from the source"; exit 1; }
  n=$(compressed_clusters "$img")
  read -r cbytes pbytes < <(map_bytes "$img" | sed 's/[a-z]*=//g')
  fsize=$(stat -c %s "$img")
  qemu-img convert -c -O qcow2 -o "$opts" "$raw" "$ref"
  rsize=$(stat -c %s "$ref")
  echo "$opts: $counts; compressed clusters $n, compressed guest bytes" \
       "$cbytes, uncompressed $pbytes; file $fsize (qemu-img convert -c: $rsize)"
  [ "$n" -gt 0 ] || { echo "no compressed clusters"; exit 1; }
  # Text always shrinks; random data never does (but the last cluster
  # may be short and padded with zeros, and then shrink).
  [ "$cbytes" -ge "$text" ] ||
    { echo "only $cbytes bytes compressed, but $text bytes of text"; exit 1; }
  [ "$pbytes" -le "$random" ] && [ "$pbytes" -ge $((random - cs)) ] ||
    { echo "$pbytes bytes stored uncompressed, $random random"; exit 1; }
  [ "$fsize" -le $((rsize * 105 / 100 + 2 * cs)) ] ||
    { echo "file is $fsize bytes, qemu-img makes $rsize"; exit 1; }
done
