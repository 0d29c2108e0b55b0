#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# qcow2-compress=true through the filter over the file plugin: the
# cluster size is advertised as the preferred block size, and seeded
# random qemu-io workloads (compress-check.py with QCOW2_MODE=filter)
# match a raw file, with qemu-img check clean and compressed clusters.
set -euo pipefail
export PATH=${QCOW2_SANITIZER_BIN:+$QCOW2_SANITIZER_BIN:}/usr/bin:$PATH
for c in qemu-img qemu-io nbdkit nbdinfo python3; do
  command -v $c >/dev/null || { echo "missing $c: skipped"; exit 77; }
done
: "${FILTER:?FILTER must name the built filter}"
d=$(mktemp -d -t test-filter-compress-XXXXXX)
trap 'rm -rf "$d"' EXIT
qemu-img create -q -f qcow2 -o cluster_size=16k "$d/b.qcow2" 16M
bs=$(nbdkit -U - --filter="$FILTER" file "$d/b.qcow2" qcow2-compress=true \
       --run 'nbdinfo --json "$uri"' | python3 -c 'import json, sys
j = json.load(sys.stdin)["exports"][0]
print(j.get("block_size_minimum"), j.get("block_size_preferred"))')
[ "$bs" = "1 16384" ] ||
  { echo "block sizes (minimum, preferred) are $bs, not 1 16384"; exit 1; }
echo "block sizes: $bs"
QCOW2_MODE=filter exec python3 "${srcdir:-$(dirname "$0")}/compress-check.py" \
  v3 zstd c4k compressed snapshot
