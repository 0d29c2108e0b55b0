#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Injected I/O errors (EIO, ENOSPC; once or for good) at write and flush
# calls of compress=true writes (see test-faults.c): the failing request
# fails cleanly, nothing crashes, qemu-img check finds no errors, and
# the data reads back as the model says.  Kinds: packed 64k clusters,
# and rewriting a compressed image with 4k clusters.
set -euo pipefail
export PATH=/usr/bin:$PATH
command -v qemu-img >/dev/null || { echo "missing qemu-img: skipped"; exit 77; }
prog=${top_builddir:-.}/tests/test-faults
[ -x "$prog" ] || { echo "$prog not built"; exit 1; }
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then
  export TMPDIR=/dev/shm
fi
export FAULTS_MAX_N=${FAULTS_MAX_N:-36}
exec "$prog" cw-64k cw-compressed-4k
