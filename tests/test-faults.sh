#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Injected EIO and ENOSPC at every pwrite/flush of a seeded workload
# (see test-faults.c).  SEED=n reproduces a run; arguments pick image
# kinds (v3 v2 rc1-4k extl2 lazy c512 c512-rc64 compressed snapshot
# layer-snapshot).
set -euo pipefail
export PATH=/usr/bin:$PATH
command -v qemu-img >/dev/null || { echo "missing qemu-img: skipped"; exit 77; }
prog=${top_builddir:-.}/tests/test-faults
[ -x "$prog" ] || { echo "$prog not built"; exit 1; }
# Scratch images are small: keep them in memory when possible.
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then
  export TMPDIR=/dev/shm
fi
exec "$prog" "$@"
