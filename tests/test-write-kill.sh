#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# kill -9 in the middle of heavy writes, trims and flushes from several
# connections, five times on the same image: qemu-img check may find
# leaked clusters, never errors.  Then one clean session must leave the
# image readable and consistent.
source "${srcdir:-$(dirname "$0")}/write-lib.sh"
requires qemu-img fio nbdkit
pick_seed
RANDOM=$seed

for opts in cluster_size=65536 cluster_size=4096,refcount_bits=2 \
            extended_l2=on; do
  img=$scratch/k.qcow2
  rm -f "$img"
  qemu-img create -q -f qcow2 -o "$opts" "$img" 256M
  for round in 1 2 3 4 5; do
    start_server "$img"
    fio --output=/dev/null --ioengine=nbd --uri="$uri" --iodepth=16 \
        --time_based --runtime=30 --randseed=$((seed + round)) \
        --name=w --rw=randwrite --bsrange=4k-256k --fsync=16 --numjobs=2 \
        --name=t --rw=randtrim --bsrange=64k-1m --numjobs=1 \
        >/dev/null 2>&1 &
    fio_pid=$!
    sleep "$((RANDOM % 3)).$((RANDOM % 10))"
    kill_server
    wait "$fio_pid" 2>/dev/null || true
    check_clean "$img" leaks-ok
    echo "round $round ($opts): killed mid-write, no errors"
  done
  # Make sure the rounds really wrote (the file grew past its metadata:
  # counted in allocated blocks, since in filter mode the file was
  # padded with a sparse tail).
  size=$(( $(stat -c %b "$img") * $(stat -c %B "$img") ))
  if [ "$size" -lt $((4 << 20)) ]; then
    echo "only $size bytes after the rounds: nothing was written"; exit 1
  fi
  start_server "$img"
  fio --output="$scratch/fio.out" --ioengine=nbd --uri="$uri" --iodepth=16 \
      --name=v --rw=randwrite --bs=64k --size=32m --verify=crc32c \
      --verify_state_save=0 \
      --verify_fatal=1 >/dev/null 2>&1 ||
    { echo "writes after the crashes failed"; tail "$scratch/fio.out"; exit 1; }
  stop_server
  check_clean "$img" leaks-ok
done
