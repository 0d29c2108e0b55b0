#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Power loss and injected EIO during the refcount repair (see
# test-repair-crash.c).  SEED=n reproduces a run; arguments pick kinds
# (dirty leaks reftable c512-dirty compressed-leaks).
set -euo pipefail
export PATH=/usr/bin:$PATH
command -v qemu-img >/dev/null || { echo "missing qemu-img: skipped"; exit 77; }
prog=${top_builddir:-.}/tests/test-repair-crash
[ -x "$prog" ] || { echo "$prog not built"; exit 1; }
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then
  export TMPDIR=/dev/shm
fi
exec "$prog" "$@"
