#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Multi-conn: writes on several connections, a flush on one, reads on a
# third; then kill -9 straight after the flush, and the data must be in
# the image (the flush made every connection's writes durable).
source "${srcdir:-$(dirname "$0")}/write-lib.sh"
requires qemu-img nbdkit python3
python3 -c 'import nbd' 2>/dev/null || { echo "no python3-libnbd: skipped"; exit 77; }
pick_seed
helper="${srcdir:-$(dirname "$0")}/multiconn.py"

for opts in compat=1.1 compat=0.10 lazy_refcounts=on extended_l2=on; do
  img=$scratch/m.qcow2
  rm -f "$img" "$scratch/m.raw"
  qemu-img create -q -f qcow2 -o "$opts" "$img" 1G
  start_server "$img"
  python3 "$helper" write "$uri" "$seed" "$scratch/spans"
  kill_server
  # A killed server may leak clusters, never corrupt; with lazy
  # refcounts the image is left dirty and qemu repairs it on open.
  if [ "$opts" != lazy_refcounts=on ]; then check_clean "$img" leaks-ok; fi
  qemu-img convert -O raw "$img" "$scratch/m.raw"
  python3 "$helper" verify "$scratch/m.raw" "$scratch/spans"
  echo "ok: $opts"
done
