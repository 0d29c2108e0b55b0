#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# nbdkit for a sanitizer build (installed as tests/sanitizer-bin/nbdkit
# and put first on PATH by `make check` when configured with
# --enable-sanitizers).  The plugin is built with -fsanitize=address,
# so the ASan runtime must be the first library of the nbdkit process:
# preload it.  Leak detection is off for nbdkit itself, which does not
# free everything at exit.  Commands started with --run must not
# inherit the preload (qemu-img and qemu-io hang under ASan), so each
# --run command starts by restoring the caller's LD_PRELOAD.  A small
# shim is preloaded too, against a hang at exit under ASan.

libasan='%LIBASAN%'
case $libasan in
    /*) test -f "$libasan" ||
            { echo "$0: $libasan does not exist" >&2; exit 1; } ;;
    *) echo "$0: the path of libasan is unknown (configure found '$libasan')" >&2
       exit 1 ;;
esac

# The real nbdkit: the first one on PATH that is not this script.
self_dir=$(cd "${0%/*}" && pwd)
real=
IFS=: read -r -a dirs <<< "$PATH"
for d in "${dirs[@]}"; do
    [ -n "$d" ] && [ "$(cd "$d" 2>/dev/null && pwd)" != "$self_dir" ] || continue
    if [ -x "$d/nbdkit" ]; then real=$d/nbdkit; break; fi
done
[ -n "$real" ] || { echo "$0: no nbdkit found on PATH" >&2; exit 1; }

if [ -n "${LD_PRELOAD+set}" ]; then
    restore="LD_PRELOAD=$(printf '%q' "$LD_PRELOAD"); export LD_PRELOAD;"
else
    restore="unset LD_PRELOAD;"
fi
args=()
while [ $# -gt 0 ]; do
    case $1 in
        --run) args+=("$1" "$restore ${2-}"); shift; [ $# -gt 0 ] && shift ;;
        --run=*) args+=("--run=$restore ${1#--run=}"); shift ;;
        *) args+=("$1"); shift ;;
    esac
done

# sanitizer-shim.so works around a hang at exit (see sanitizer-shim.c).
shim=$self_dir/sanitizer-shim.so
test -f "$shim" || { echo "$0: $shim is missing" >&2; exit 1; }

LD_PRELOAD=$libasan:$shim${LD_PRELOAD:+:$LD_PRELOAD} \
ASAN_OPTIONS=detect_leaks=0${ASAN_OPTIONS:+:$ASAN_OPTIONS} \
UBSAN_OPTIONS=print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS} \
    exec "$real" "${args[@]}"
