#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# A full disk: the image lives on a 24 MiB tmpfs (with a 4 MiB filler
# file) and is written through NBD until a write fails.  The error must
# be ENOSPC, the server must keep answering, every write acknowledged
# and flushed before must read back, a clean shutdown must leave an
# image that qemu-img check passes (leaks allowed), and once the filler
# is deleted writes must work again.  Needs root (mount); skipped
# otherwise.
source "${srcdir:-$(dirname "$0")}/write-lib.sh"
requires qemu-img nbdkit python3 mount umount timeout
python3 -c 'import nbd' 2>/dev/null || { echo "no python3-libnbd: skipped"; exit 77; }
# A hang is a failure too.
helper="timeout 300 python3 ${srcdir:-$(dirname "$0")}/full-disk.py"
pick_seed

mnt=$scratch/mnt
mkdir "$mnt"
mounted=
unmount () {
  kill_server
  if [ -n "$mounted" ]; then umount "$mnt" && mounted=; fi
  cleanup
}
trap unmount EXIT
mount -t tmpfs -o size=24m tmpfs "$mnt" 2>/dev/null ||
  { echo "cannot mount a tmpfs (not root?): skipped"; exit 77; }
mounted=1

img=$mnt/disk.qcow2
state=$scratch/state.json

# run_case CREATE-OPTIONS
run_case () {
  echo "== qemu-img create -o $1"
  rm -f "$img" "$state" "$scratch/nbdkit.log"
  dd if=/dev/urandom of="$mnt/filler" bs=1M count=4 status=none
  qemu-img create -q -f qcow2 -o "$1" "$img" 100M

  # 1. Fill it up.
  start_server "$img"
  $helper fill "$uri" "$state" "$seed"
  kill -0 "$srv_pid" || { echo "the server died"; cat "$scratch/nbdkit.log"; exit 1; }
  grep -q "No space left on device" "$scratch/nbdkit.log" ||
    { echo "the server log does not mention ENOSPC:"; tail "$scratch/nbdkit.log"; exit 1; }
  echo "ok: writes failed with ENOSPC; the server kept answering"

  # 2. A clean shutdown while the disk is still full.
  stop_server
  check_clean "$img" leaks-ok
  qemu-img convert -U -f qcow2 -O raw "$img" "$scratch/out.raw"
  $helper verify-raw "$scratch/out.raw" "$state"
  rm -f "$scratch/out.raw"
  echo "ok: after a clean shutdown on a full disk, qemu-img check finds no errors"

  # 3. Free some space: writes work again.
  rm -f "$mnt/filler"
  start_server "$img"
  $helper verify-nbd "$uri" "$state"
  $helper more "$uri" "$state" "$seed" 3
  stop_server
  check_clean "$img" leaks-ok
  qemu-img convert -U -f qcow2 -O raw "$img" "$scratch/out.raw"
  $helper verify-raw "$scratch/out.raw" "$state"
  rm -f "$scratch/out.raw"
  echo "ok: with space freed, writes work again and everything reads back"
}

run_case cluster_size=64k
# Small clusters: L2 tables and refcount blocks are allocated as the
# disk fills, so metadata allocations meet ENOSPC too.
run_case cluster_size=4k,refcount_bits=64
