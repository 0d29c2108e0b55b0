#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Injected I/O errors (EIO, ENOSPC; once or for good) at write and flush
# calls of compress=true writes (see test-faults.c): the failing request
# fails cleanly, nothing crashes, qemu-img check finds no errors, and
# the data reads back as the model says.  Kinds: packed 64k clusters,
# and rewriting a compressed image with 4k clusters.
# test-faults.sh, with these kinds and fewer fault points.
export FAULTS_MAX_N=${FAULTS_MAX_N:-36}
exec bash "${srcdir:-${0%/*}}/test-faults.sh" cw-64k cw-compressed-4k
