#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# compress=true with several connections writing into the same clusters
# at once: fio's nbd engine, 4 jobs with 16 requests in flight each.
# Interleaved 4k blocks put four writers in every cluster (each write a
# read-modify-write of the whole cluster, so a lost update would show);
# then random unaligned sizes.  fio verifies every block; qemu-img check
# must be clean with no leaks and count compressed clusters.
source "${srcdir:-$(dirname "$0")}/write-lib.sh"
source "${srcdir:-$(dirname "$0")}/compress-lib.sh"
requires qemu-img fio nbdkit

fio_job () {
  local name=$1; shift
  fio --output="$scratch/fio-$name.out" --name="$name" --ioengine=nbd \
      --uri="$uri" --iodepth=16 --numjobs=4 --group_reporting \
      --buffer_compress_percentage=70 --refill_buffers \
      --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_state_save=0 "$@" ||
    { echo "fio $name failed:"; tail -20 "$scratch/fio-$name.out"; exit 1; }
  grep -q "err= 0" "$scratch/fio-$name.out" ||
    { echo "fio $name reported errors"; exit 1; }
}

for opts in "cluster_size=65536" "cluster_size=16384,compression_type=zstd" \
            "extended_l2=on,refcount_bits=8"; do
  img=$scratch/c.qcow2
  rm -f "$img"
  qemu-img create -q -f qcow2 -o "$opts" "$img" 64M
  start_server "$img" compress=true
  # Job j writes 4k blocks j, j+4, j+8, ...: four writers per cluster.
  fio_job interleaved --rw=write:12k --bs=4k --size=4m --offset_increment=4k
  fio_job random --rw=randwrite --bsrange=512-96k --blockalign=512 \
    --size=6m --offset=32m --offset_increment=6m
  stop_server
  n=$(compressed_clusters "$img")
  [ "$n" -gt 0 ] || { echo "$opts: no compressed clusters"; exit 1; }
  echo "ok: $opts, $n compressed clusters"
done
