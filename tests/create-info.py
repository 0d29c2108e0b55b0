#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Assert fields of `qemu-img info --output=json`.

usage: create-info.py INFO.json KEY=VALUE...
KEY is a top-level field (virtual-size, cluster-size, backing-filename,
backing-filename-format, encrypted) or one of format-specific.data
(compat, compression-type, lazy-refcounts, refcount-bits, extended-l2,
data-file, data-file-raw, corrupt), or encrypt-X for field X of the
encryption details (encrypt-format, encrypt-cipher-alg ...).  VALUE "absent"
means the field must not be there.  The expected values come from the
test's own option table, never from the plugin.
"""

import json
import sys

info = json.load(open(sys.argv[1]))
data = info.get("format-specific", {}).get("data", {})
bad = []
expect = {}
for kv in sys.argv[2:]:                 # later arguments override
    key, want = kv.split("=", 1)
    expect[key] = want
for key, want in expect.items():
    if key.startswith("encrypt-"):
        got = data.get("encrypt", {}).get(key[len("encrypt-"):])
    elif key in info:
        got = info[key]
    else:
        got = data.get(key)
    if want == "absent":
        ok = got is None
    elif isinstance(got, bool):
        ok = str(got).lower() == want
    else:
        ok = got is not None and str(got) == want
    if not ok:
        bad.append(f"{key}: expected {want}, qemu-img info says {got}")
if info.get("format") != "qcow2":
    bad.append(f"format: {info.get('format')}")
if bad:
    print("\n".join(bad), file=sys.stderr)
    sys.exit(1)
print("ok: qemu-img info: " + " ".join(f"{k}={v}" for k, v in expect.items()))
