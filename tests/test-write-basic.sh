#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Randomised qemu-io workloads through the plugin, checked against the
# same workload on a raw file and by qemu-img check (see write-check.py).
set -euo pipefail
export PATH=${QCOW2_SANITIZER_BIN:+$QCOW2_SANITIZER_BIN:}/usr/bin:$PATH
for c in qemu-img qemu-io nbdkit python3; do
  command -v $c >/dev/null || { echo "missing $c: skipped"; exit 77; }
done
exec python3 "${srcdir:-$(dirname "$0")}/write-check.py" v2 v3 c512 c2M rc1 rc64 rc1-c512 rc64-c512 big
