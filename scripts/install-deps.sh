#!/bin/bash
# SPDX-License-Identifier: BSD-3-Clause
# Install the Debian 12 packages needed to build, test and fuzz nbdkit-qcow2.
# Only missing packages are installed, so this is cheap to run every time.
set -euo pipefail

packages=(
    build-essential autoconf automake libtool pkg-config
    nbdkit nbdkit-plugin-dev
    zlib1g-dev libzstd-dev nettle-dev libnbd-dev
    qemu-utils libnbd-bin python3-libnbd fio
    cryptsetup-bin  # cryptsetup luksDump: an independent check of LUKS headers
    perl        # pod2man and podchecker, for the man page
    clang       # for the fuzzers
)

missing=()
for p in "${packages[@]}"; do
    # dpkg-query fails for unknown packages and prints e.g.
    # "deinstall ok config-files" for removed ones: accept only installed.
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$p")
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install-deps: all ${#packages[@]} packages already installed"
    exit 0
fi

echo "install-deps: missing: ${missing[*]}"
if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: not root; run this and try again:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi

# No prompts: CI runs us without a terminal or stdin.
export DEBIAN_FRONTEND=noninteractive
apt-get update </dev/null
apt-get install -y --no-install-recommends "${missing[@]}" </dev/null
