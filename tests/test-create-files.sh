#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# create=true with preallocation, backing files and data files: the
# second half of test-create.sh's matrix.
CREATE_FILES=1 exec bash "${srcdir:-$(dirname "$0")}/test-create.sh"
