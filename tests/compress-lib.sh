# SPDX-License-Identifier: BSD-3-Clause
# Helpers for the compressed-write tests (sourced after write-lib.sh).

# map_bytes IMAGE: print "compressed=N plain=N" - the guest bytes that
# qemu-img map shows as data without a host offset (compressed
# clusters; qemu-img 7.2 has no "compressed" field) and with one.
map_bytes () {
  qemu-img map --output=json "$1" | python3 -c '
import json, sys
c = p = 0
for e in json.load(sys.stdin):
    if e["data"] and e.get("depth", 0) == 0:
        if "offset" in e:
            p += e["length"]
        else:
            c += e["length"]
print(f"compressed={c} plain={p}")'
}

# compressed_clusters IMAGE: qemu-img check must find no errors and
# no leaks; print its count of compressed clusters.
compressed_clusters () {
  check_clean "$1" >&2
  qemu-img check --output=json "$1" | python3 -c '
import json, sys
print(json.load(sys.stdin).get("compressed-clusters", 0))'
}

# count_compressed IMAGE: qemu-img check's count of compressed
# clusters, whatever else it reports.
count_compressed () {
  { qemu-img check --output=json "$1" 2>/dev/null || true; } | python3 -c '
import json, sys
print(json.load(sys.stdin).get("compressed-clusters", 0))'
}

# own_check IMAGE: the plugin's own check (repair=check, see
# qcow2-check.c) must agree with qemu-img: no errors, no leaks.
own_check () {
  nbdkit -f -v -U - "$PLUGIN" "file=$1" repair=check --run true \
    > "$scratch/own-check.log" 2>&1 || true
  grep -q "check: no errors, no leaks" "$scratch/own-check.log" ||
    { echo "repair=check disagrees:"; grep -i "check" "$scratch/own-check.log" | head; return 1; }
}
