#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# Run every fuzzing regression input (fuzz/regressions: inputs that once
# crashed the layer) and every seed (fuzz/corpus) once: through
# fuzz/fuzz-replay, built by the normal compiler (so this runs without
# clang, and under ASan with leak checks in make check-sanitizers), and
# through the libFuzzer binary when clang built it.

[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -u
export LC_ALL=C
progname=${0##*/}
top_srcdir=${top_srcdir:-$(cd "${0%/*}/.." && pwd)}
top_builddir=${top_builddir:-.}

fail () { echo "$progname: FAIL: $*" >&2; exit 1; }

inputs=()
for f in "$top_srcdir"/fuzz/regressions/* "$top_srcdir"/fuzz/corpus/*; do
    case ${f##*/} in README*|'*') continue ;; esac
    [ -f "$f" ] && inputs+=("$f")
done
nreg=$(ls "$top_srcdir"/fuzz/regressions | grep -vc '^README' || true)
[ "${#inputs[@]}" -gt 10 ] || fail "only ${#inputs[@]} inputs found"

replay=$top_builddir/fuzz/fuzz-replay
[ -x "$replay" ] || fail "$replay is not built"
"$replay" "${inputs[@]}" || fail "fuzz-replay failed on an input (see above)"
echo "ok: fuzz-replay ran ${#inputs[@]} inputs ($nreg regressions)"

fz=$top_builddir/fuzz/fuzz-image
if [ -x "$fz" ]; then
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    if ! "$fz" "${inputs[@]}" >"$log" 2>&1; then
        tail -60 "$log" >&2
        fail "the libFuzzer binary failed on an input (see above)"
    fi
    echo "ok: fuzz-image (libFuzzer) ran ${#inputs[@]} inputs"
else
    echo "$progname: no libFuzzer binary (clang not found); replay driver only"
fi
