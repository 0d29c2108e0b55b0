#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Seeded random qemu-io workloads through the filter over the file
# plugin, checked against the same workload on a raw file and by
# qemu-img check (write-check.py with QCOW2_MODE=filter).
set -euo pipefail
export PATH=${QCOW2_SANITIZER_BIN:+$QCOW2_SANITIZER_BIN:}/usr/bin:$PATH
for c in qemu-img qemu-io nbdkit python3; do
  command -v $c >/dev/null || { echo "missing $c: skipped"; exit 77; }
done
: "${FILTER:?FILTER must name the built filter}"
QCOW2_MODE=filter exec python3 "${srcdir:-$(dirname "$0")}/write-check.py" \
  v2 v3 c512 c2M rc1 rc64-c512 extl2 extl2-16k lazy backing compressed-zstd \
  snapshot datafile prealloc big
