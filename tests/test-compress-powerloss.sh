#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Power-loss replay of compress=true writes (see test-powerloss.c): at
# every flush point, files rebuilt from the writes a power cut could
# have kept must pass qemu-img check without errors and keep every
# acknowledged write.  Kinds: packed 64k clusters, 4k zstd, and
# rewriting a compressed image with 2-bit refcounts.
# test-powerloss.sh, with these kinds and fewer cut points.
export POWERLOSS_CUTS=${POWERLOSS_CUTS:-25} POWERLOSS_VARIANTS=${POWERLOSS_VARIANTS:-4}
exec bash "${srcdir:-${0%/*}}/test-powerloss.sh" cw-64k cw-4k-zstd cw-compressed-rc2
