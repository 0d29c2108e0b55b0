#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# A short fuzzing run (FUZZ_CHECK_SECONDS, default 20) of fuzz/fuzz-image
# from the seed corpus.  Skipped when clang (libFuzzer) is not
# available.  A crash fails the test; the input is kept in
# fuzz/artifacts/ to be fixed and then added to fuzz/regressions/.

[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -u
export LC_ALL=C
progname=${0##*/}
top_srcdir=${top_srcdir:-$(cd "${0%/*}/.." && pwd)}
top_builddir=${top_builddir:-.}

fz=$top_builddir/fuzz/fuzz-image
if [ ! -x "$fz" ]; then
    echo "$progname: SKIP: no libFuzzer binary (configure did not find clang)" >&2
    exit 77
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/corpus" "$tmp/artifacts"
secs=${FUZZ_CHECK_SECONDS:-20}
r=0
"$fz" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -dict="$top_srcdir/fuzz/qcow2.dict" -artifact_prefix="$tmp/artifacts/" \
    "$tmp/corpus" "$top_srcdir/fuzz/corpus" >"$tmp/log" 2>&1 || r=$?
grep -E '^(INFO: Seed|#[0-9]+.*DONE|stat::number_of_executed_units|stat::peak_rss)' "$tmp/log"
if [ $r -ne 0 ] || [ -n "$(ls "$tmp/artifacts")" ]; then
    tail -80 "$tmp/log" >&2
    mkdir -p "$top_builddir/fuzz/artifacts"
    cp "$tmp"/artifacts/* "$top_builddir/fuzz/artifacts/" 2>/dev/null
    echo "$progname: FAIL: the fuzzer found a problem (exit $r); inputs kept in $top_builddir/fuzz/artifacts/" >&2
    exit 1
fi
echo "ok: fuzzed for $secs s without a crash"
