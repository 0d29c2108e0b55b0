#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# Build, run `make check`, and end with one summary line:
#   N passed, N failed[, N skipped]
# Arguments are passed to ./configure via build.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# A build failure is one failure: there are no test results to count.
if ! ./scripts/build.sh "$@"; then
    echo "test: build failed, no tests were run" >&2
    echo "0 passed, 1 failed"
    exit 1
fi

# A stale log from an earlier run must not be mistaken for this one.
rm -f test-suite.log
make_status=0
# /usr/bin first, so nbdsh runs with Debian's python3 (which has libnbd).
PATH=/usr/bin:$PATH make -j2 check || make_status=$?

if [[ ! -f test-suite.log ]]; then
    echo "test: make check failed before running the tests" >&2
    echo "0 passed, 1 failed"
    exit 1
fi

count() { # the number after "# NAME:" in test-suite.log
    sed -n "s/^# $1: *\([0-9][0-9]*\).*/\1/p" test-suite.log | head -n 1
}
pass=$(count PASS) xfail=$(count XFAIL) skip=$(count SKIP)
fail=$(count FAIL) xpass=$(count XPASS) error=$(count ERROR)
passed=$(( ${pass:-0} + ${xfail:-0} ))
failed=$(( ${fail:-0} + ${xpass:-0} + ${error:-0} ))

if [[ $failed -gt 0 ]]; then
    # Show each bad test's own log; the .trs file records its result.
    for trs in $(grep -l -E '^:test-result: (FAIL|XPASS|ERROR)' \
                     $(find tests -name '*.trs' | sort) /dev/null); do
        echo "===== ${trs%.trs}.log ====="
        cat "${trs%.trs}.log" || true
    done
elif [[ $make_status -ne 0 ]]; then
    # Every test passed but make still failed: count that, do not hide it.
    echo "test: make check exited with status $make_status" >&2
    failed=1
fi

summary="$passed passed, $failed failed"
[[ ${skip:-0} -gt 0 ]] && summary+=", $skip skipped"
echo "$summary"
[[ $failed -eq 0 ]]
