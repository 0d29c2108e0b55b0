#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Power cuts and injected EIO during snapshot-create, -apply and
# -delete (see test-snapshot-crash.c).  SEED=n reproduces a run;
# arguments pick image kinds (v3 v2 c512 extl2 compressed rc2-4k); by
# default four of them, to keep make check short (SNAPCRASH_KINDS=all
# runs every kind).
set -euo pipefail
export PATH=/usr/bin:$PATH
command -v qemu-img >/dev/null || { echo "missing qemu-img: skipped"; exit 77; }
command -v qemu-io >/dev/null || { echo "missing qemu-io: skipped"; exit 77; }
prog=${top_builddir:-.}/tests/test-snapshot-crash
[ -x "$prog" ] || { echo "$prog not built"; exit 1; }
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then
  export TMPDIR=/dev/shm
fi
if [ $# -eq 0 ]; then
  case ${SNAPCRASH_KINDS:-} in
    all) ;;
    '') set -- v3 c512 extl2 compressed ;;
    *) set -- $SNAPCRASH_KINDS ;;
  esac
fi
exec "$prog" "$@"
