#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# Build, then serve a qcow2 image with the freshly built plugin in the
# foreground.  Usage: scripts/demo.sh [IMAGE.qcow2]   (PORT=10809 by default)
set -euo pipefail
# Resolve a relative image path before changing to the repository top.
image=${1:+$(realpath -- "$1")}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
top=$PWD

./scripts/build.sh

plugin=$top/.libs/nbdkit-qcow2-plugin.so
port=${PORT:-10809}
[[ -f $plugin ]] || { echo "demo: $plugin was not built" >&2; exit 1; }

if [[ -z $image ]]; then
    # A fresh sparse 1 GiB image with a few recognisable allocated extents.
    image=${TMPDIR:-/tmp}/nbdkit-qcow2-demo.qcow2
    qemu-img create -q -f qcow2 "$image" 1G
    qemu-io -f qcow2 \
        -c 'write -P 0x61 0 1M' \
        -c 'write -P 0x62 256M 64k' \
        -c 'write -z 512M 1M' \
        "$image" >/dev/null
elif [[ ! -f $image ]]; then
    echo "demo: $1: no such file" >&2
    exit 1
fi

uri=nbd://localhost:$port
cat <<INFO

Serving $image
  NBD URI: $uri
From another terminal, try:
  nbdinfo $uri
  nbdinfo --map $uri
  nbdcopy $uri out.raw
  qemu-img compare -f raw -F qcow2 $uri $image
Press Ctrl-C to stop the server.

INFO

# Listen on loopback only: the export is writable and has no access control.
exec nbdkit -f -i localhost -p "$port" "$plugin" file="$image"
