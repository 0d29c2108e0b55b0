#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Repair (repair=all) of leaked images with internal snapshots and
# compressed clusters, in several layouts (4 KiB clusters with 32-bit
# refcounts, extended L2, v2) and with a persistent bitmap: the
# plugin's check counts as qemu-img check does, and after the repair
# the image is clean, the active layer and the snapshot unchanged.
source "${srcdir:-$(dirname "$0")}/repair-lib.sh"
woff=$((512 << 10))   # inside the compressed data

# 4. Snapshots, compressed clusters, 4 KiB clusters with 32-bit
# refcounts, extended L2, v2, and a bitmap, each with a leak.
for opts in cluster_size=4096,refcount_bits=32 extended_l2=on compat=0.10; do
  head -c 3M /dev/urandom > src.raw
  head -c 1M /dev/zero >> src.raw
  rm -f s.qcow2
  qemu-img convert -c -O qcow2 -o "$opts" src.raw s.qcow2
  qemu-img snapshot -c s1 s.qcow2
  qemu-io -c 'write -P 0x42 1M 300k' -c 'write -P 0x43 3M 64k' s.qcow2 >/dev/null
  qemu-img snapshot -c s2 s.qcow2
  qemu-io -c 'write -P 0x44 2M 64k' s.qcow2 >/dev/null
  case $opts in compat=0.10) ;; *) qemu-img bitmap --add s.qcow2 bm0 ;; esac
  qemu-img convert -l snapshot.name=s1 -O raw s.qcow2 s1.raw
  nf=$(( ($(stat -c %s s.qcow2) + 4095) >> 12 ))
  # A leaked cluster past the used area, inside the refcount blocks.
  cs=$(qemu-img info --output=json s.qcow2 |
       python3 -c 'import json,sys; print(json.load(sys.stdin)["cluster-size"])')
  $rcp set-rc s.qcow2 $(( ($(stat -c %s s.qcow2) + cs - 1) / cs - 1 )) 3
  compare_counts s.qcow2 "$opts, compressed, snapshots: a leak"
  repair_and_verify s.qcow2 "$opts, compressed, snapshots"
  qemu-img convert -l snapshot.name=s1 -O raw s.qcow2 s1.after
  cmp -s s1.raw s1.after || fail "$opts: snapshot s1 changed"
done

