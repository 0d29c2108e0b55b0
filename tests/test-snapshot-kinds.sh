#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The second half of test-snapshot-ops.sh: snapshot-create/-apply/
# -delete against qemu-img on compressed clusters, a backing file, and
# 512 B and 2 MiB clusters.
SNAP_PART=2 exec bash "${srcdir:-${0%/*}}/test-snapshot-ops.sh" "$@"
