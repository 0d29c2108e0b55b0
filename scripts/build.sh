#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# Install missing dependencies, then configure and build in the source tree.
# Arguments are passed to ./configure (which then always reruns).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

./scripts/install-deps.sh

# Regenerate the build system only when it is missing or stale, so that
# repeated runs do not rebuild everything.
if [[ ! -x configure ]] ||
   [[ configure.ac -nt configure || Makefile.am -nt configure ||
      tests/Makefile.am.inc -nt configure ]]; then
    autoreconf -fi
fi

if [[ $# -gt 0 || ! -f Makefile || configure -nt config.status ]]; then
    ./configure "$@"
fi

make -j2
