#!/usr/bin/env bash
# nbdkit-qcow2 benchmark: plugin vs qemu-nbd vs raw.  See bench/README.md.
# SPDX-License-Identifier: BSD-3-Clause
#
# Usage: run-bench.sh [PATH/TO/nbdkit-qcow2-plugin.so]
# Knobs are environment variables (QUICK, SIZE, REPS, RUNTIME, TMPDIR,
# STANDIN, ...), listed in bench/README.md.

set -e
set -o pipefail

bench_dir="$(cd "$(dirname "$0")" && pwd)"
srcdir="$(dirname "$bench_dir")"

if [ -n "$1" ]; then
    PLUGIN="$1"
fi
: "${PLUGIN:=$srcdir/.libs/nbdkit-qcow2-plugin.so}"
export PLUGIN
# Workloads j and k: the filter built next to the plugin.
: "${FILTER:=$(dirname "$PLUGIN")/nbdkit-qcow2-filter.so}"
export FILTER

for prog in nbdkit qemu-nbd qemu-img qemu-io fio nbdcopy "${PYTHON:-python3}"; do
    if ! command -v "$prog" >/dev/null 2>&1; then
        echo "$0: $prog is required (apt-get install nbdkit qemu-utils fio libnbd-bin)" >&2
        exit 1
    fi
done
if ! fio --enghelp 2>/dev/null | grep -qw nbd; then
    echo "$0: this fio has no nbd ioengine" >&2
    exit 1
fi

: "${TMPDIR:=/var/tmp}"
export TMPDIR
workdir="$(mktemp -d "$TMPDIR/nbdkit-qcow2-bench.XXXXXX")"

cleanup ()
{
    local rc=$?
    trap - EXIT INT TERM HUP
    # The driver stops its own servers; this is the backstop if it was
    # killed hard.  Only the PIDs it recorded are touched.
    if [ -s "$workdir/pids" ]; then
        while read -r pid; do
            kill "$pid" 2>/dev/null || :
        done < "$workdir/pids"
        sleep 1
        while read -r pid; do
            kill -9 "$pid" 2>/dev/null || :
        done < "$workdir/pids"
    fi
    if [ "${KEEP:-0}" = 0 ]; then
        rm -rf "$workdir"
    else
        echo "$0: kept $workdir" >&2
    fi
    exit $rc
}
trap cleanup EXIT

# The driver runs in the background so that a signal to this script is
# handled at once: it is passed on, and the driver stops its servers.
on_signal ()
{
    kill -TERM "$driver" 2>/dev/null || :
    wait "$driver" 2>/dev/null || :
    exit $((128 + $1))
}
trap 'on_signal 1' HUP
trap 'on_signal 2' INT
trap 'on_signal 15' TERM

export BENCH_WORKDIR="$workdir" BENCH_SRCDIR="$srcdir"
"${PYTHON:-python3}" "$bench_dir/bench.py" &
driver=$!
wait "$driver"
