#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Several connections writing at once (fio's nbd engine, 4 jobs, each
# with its own connection and 16 requests in flight), with verification,
# then qemu-img check.  Once with interleaved 4k blocks, so that every
# cluster is allocated by several writers at once, and once with random
# sizes; each with the default cache and with a tiny L2 cache.
source "${srcdir:-$(dirname "$0")}/write-lib.sh"
requires qemu-img fio nbdkit

fio_job () {
  local name=$1; shift
  fio --output="$scratch/fio-$name.out" --name="$name" --ioengine=nbd \
      --uri="$uri" --iodepth=16 --numjobs=4 --group_reporting \
      --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_state_save=0 "$@" ||
    { echo "fio $name failed:"; tail -20 "$scratch/fio-$name.out"; exit 1; }
  grep -q "err= 0" "$scratch/fio-$name.out" ||
    { echo "fio $name reported errors"; exit 1; }
}

for cache in default 4K; do
  for opts in "cluster_size=65536" "cluster_size=4096,refcount_bits=1" \
              "extended_l2=on"; do
    img=$scratch/c.qcow2
    rm -f "$img"
    qemu-img create -q -f qcow2 -o "$opts" "$img" 256M
    args=()
    [ "$cache" = default ] || args=(l2-cache-size=$cache)
    start_server "$img" "${args[@]}"
    # Job j writes 4k blocks j, j+4, j+8, ...: four writers per cluster.
    fio_job interleaved --rw=write:12k --bs=4k --size=32m \
      --offset_increment=4k
    fio_job random --rw=randwrite --bsrange=512-256k --blockalign=512 \
      --size=48m --offset=64m --offset_increment=48m
    stop_server
    check_clean "$img"
    echo "ok: $opts, L2 cache $cache"
  done
done
