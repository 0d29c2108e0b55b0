#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Power-loss replay: the file as a power cut after each flush could
# leave it must pass qemu-img check and keep every acknowledged write
# (see test-powerloss.c).  SEED=n reproduces a run; arguments pick image
# kinds (64k 64k-rc1 4k 4k-rc1 c512-rc64 lazy extl2 compressed snapshot
# layer-snapshot).
set -euo pipefail
export PATH=/usr/bin:$PATH
command -v qemu-img >/dev/null || { echo "missing qemu-img: skipped"; exit 77; }
prog=${top_builddir:-.}/tests/test-powerloss
[ -x "$prog" ] || { echo "$prog not built"; exit 1; }
# Scratch images are small: keep them in memory when possible.
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then
  export TMPDIR=/dev/shm
fi
exec "$prog" "$@"
