#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# test-write-concurrent.sh again, served through the filter over the file
# plugin (see start_server in write-lib.sh).
QCOW2_MODE=filter exec bash "${srcdir:-${0%/*}}/test-write-concurrent.sh" "$@"
