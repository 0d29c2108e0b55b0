#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# compress=true under seeded random qemu-io workloads (unaligned and
# concurrent writes into shared clusters, zeroes, discards, rewrites),
# compared with a raw file; qemu-img check clean with no leaks.
set -euo pipefail
export PATH=${QCOW2_SANITIZER_BIN:+$QCOW2_SANITIZER_BIN:}/usr/bin:$PATH
for c in qemu-img qemu-io nbdkit python3; do
  command -v $c >/dev/null || { echo "missing $c: skipped"; exit 77; }
done
exec python3 "${srcdir:-$(dirname "$0")}/compress-check.py" \
  v3 zstd v2 c512 c2M rc1 extl2-zstd lazy backing compressed snapshot
