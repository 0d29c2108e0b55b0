#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# compress=true: kill -9 in the middle of heavy unaligned compressed
# writes, trims and flushes from two connections, three times on the
# same image: qemu-img check may find leaked clusters, never errors.
# Then a clean session with verified writes must work on the image.
source "${srcdir:-$(dirname "$0")}/write-lib.sh"
source "${srcdir:-$(dirname "$0")}/compress-lib.sh"
requires qemu-img fio nbdkit
pick_seed
RANDOM=$seed

for opts in cluster_size=65536 cluster_size=4096,compression_type=zstd \
            extended_l2=on,refcount_bits=4; do
  img=$scratch/k.qcow2
  rm -f "$img"
  qemu-img create -q -f qcow2 -o "$opts" "$img" 64M
  for round in 1 2 3; do
    start_server "$img" compress=true
    fio --output=/dev/null --ioengine=nbd --uri="$uri" --iodepth=16 \
        --time_based --runtime=30 --randseed=$((seed + round)) \
        --buffer_compress_percentage=60 --refill_buffers \
        --name=w --rw=randwrite --bsrange=512-192k --blockalign=512 \
        --fsync=8 --numjobs=2 \
        --name=t --rw=randtrim --bsrange=64k-1m --numjobs=1 \
        >/dev/null 2>&1 &
    fio_pid=$!
    # Kill only once writes are under way (the machine may be slow to
    # start fio), then at a random moment.
    grown=$(( $(stat -c %s "$img") + (256 << 10) ))
    for _ in $(seq 100); do
      [ "$(stat -c %s "$img")" -ge "$grown" ] && break
      sleep 0.05
    done
    sleep "0.$((RANDOM % 10))"
    kill_server
    wait "$fio_pid" 2>/dev/null || true
    check_clean "$img" leaks-ok
    echo "round $round ($opts): killed mid-write, no errors"
  done
  start_server "$img" compress=true
  fio --output="$scratch/fio.out" --ioengine=nbd --uri="$uri" --iodepth=16 \
      --name=v --rw=randwrite --bs=24k --size=8m --verify=crc32c \
      --verify_state_save=0 --buffer_compress_percentage=50 \
      --verify_fatal=1 >/dev/null 2>&1 ||
    { echo "writes after the crashes failed"; tail "$scratch/fio.out"; exit 1; }
  stop_server
  check_clean "$img" leaks-ok
  n=$(count_compressed "$img")
  [ "$n" -gt 0 ] || { echo "no compressed clusters"; exit 1; }
  echo "$opts: $n compressed clusters; verified writes after the crashes"
done
