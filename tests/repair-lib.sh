# SPDX-License-Identifier: BSD-3-Clause
# Helpers for the repair tests (repair=): damaged images, and the
# plugin's check compared with qemu-img check.
source "${srcdir:-$(dirname "$0")}/write-lib.sh"
requires qemu-img qemu-io nbdkit nbdsh python3
here=$(cd "${srcdir:-$(dirname "$0")}" && pwd)
rcp="python3 $here/rc-patch.py"
patch="python3 $here/qcow2-patch.py"
cd "$scratch"

fail () { echo "FAIL: $*"; [ -f log ] && tail -20 log; exit 1; }

# qemu_counts IMG: "LEAKS CORRUPTIONS" as qemu-img check reports them.
qemu_counts () {
  { qemu-img check --output=json "$1" 2>/dev/null || true; } |
    python3 -c 'import json, sys
d = json.load(sys.stdin)
print(d.get("leaks", 0), d.get("corruptions", 0))'
}

# our_counts IMG [ARGS...]: the same from the plugin's check at open.
our_counts () {
  local img=$1; shift
  nbdkit -U - "$PLUGIN" file="$img" "$@" repair=check --run true 2> log ||
    fail "nbdkit repair=check on $img failed"
  python3 -c 'import re, sys
m = re.search(r"check found (\d+) leaked clusters, (\d+) refcount errors "
              r"and (\d+) wrong COPIED flags", open("log").read())
print("0 0" if m is None else "%s %d" % (m[1], int(m[2]) + int(m[3])))'
}

compare_counts () {
  local q o
  q=$(qemu_counts "$1"); o=$(our_counts "$1")
  [ "$q" = "$o" ] || fail "$2: qemu-img check counts '$q', the plugin '$o'"
  echo "ok: $2: leaks/corruptions $q, as qemu-img check"
}

# The guest content as a raw file.
raw_of () { qemu-img convert -U -O raw "$1" "$2"; }

# write_both IMG REF OFFSET: one write through the plugin with repair
# as given in $repair, the same on the raw reference.
write_both () {
  nbdkit -U - "$PLUGIN" file="$1" ${repair:+repair=$repair} --run \
    "qemu-io -f raw -c 'write -P 0xa7 $3 70000' \"\$uri\"" >/dev/null 2> log ||
    fail "the write to $1 failed"
  qemu-io -f raw -c "write -P 0xa7 $3 70000" "$2" >/dev/null
}

# repair_and_verify IMG NAME: repair=all, one write, then clean and
# the content as expected.
repair_and_verify () {
  raw_of "$1" before.raw
  repair=all write_both "$1" before.raw "${woff:-$((6 << 20))}"
  grep -q "repaired" log || fail "$2: nothing logged about the repair"
  check_clean "$1" || fail "$2: not clean after repair=all"
  raw_of "$1" after.raw
  cmp -s before.raw after.raw || fail "$2: guest data changed by the repair"
  echo "ok: $2: repair=all leaves no errors and no leaks, data intact"
}

base () {
  rm -f "$1"
  qemu-img create -q -f qcow2 ${2:+-o "$2"} "$1" 16M
  qemu-io -c 'write -P 0x55 0 1M' -c 'write -P 0x66 10M 1M' \
          -c 'write -P 0x77 12M 64k' "$1" >/dev/null
}

