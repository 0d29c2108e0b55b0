#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# test-read-refcount-bits.sh again, with every image served through the filter
# over the file plugin (see QCOW2_MODE in functions.sh).
QCOW2_MODE=filter exec bash "${srcdir:-${0%/*}}/test-read-refcount-bits.sh" "$@"
