#!/usr/bin/env python3
# Compare two nbdkit-qcow2 benchmark result files.
# SPDX-License-Identifier: BSD-3-Clause
#
# Usage: compare.py OLD.txt NEW.txt
#
# Prints, per workload and server, the old and new medians and the
# change, signed so that "+" is always an improvement (more IOPS or
# MiB/s, fewer seconds or MiB), plus the old and new plugin ratios.
# Changes within the noise threshold (NOISE, default 5%) are marked "~".

import json
import os
import signal
import sys

SERVERS = (("plugin", "plugin"), ("qemu", "qemu-nbd"), ("raw", "raw"),
           ("qemu-img", "qemu-img"))


def load(path):
    with open(path) as f:
        text = f.read()
    try:
        start = text.index("--- BEGIN JSON ---") + len("--- BEGIN JSON ---")
        end = text.index("--- END JSON ---")
    except ValueError:
        sys.exit("%s: not a benchmark result file (no JSON block)" % path)
    return json.loads(text[start:end])


def fmt(v, unit):
    if v is None:
        return "n/a"
    if unit == "s":
        return "%.2f" % v
    return "%.0f" % v if v >= 1000 else "%.1f" % v


def change(old, new, better, noise):
    """Improvement in percent (positive = better) and a mark."""
    if old is None or new is None or old == 0:
        return "", " "
    pct = (new - old) / old * 100.0
    if better == "lower":
        pct = -pct
    mark = "~" if abs(pct) < noise else ("+" if pct > 0 else "-")
    return "%+.1f%%" % pct, mark


def ratio(v):
    return "n/a" if v is None else "%.2f" % v


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if len(sys.argv) != 3:
        sys.exit("usage: compare.py OLD NEW")
    noise = float(os.environ.get("NOISE", "5"))
    old, new = load(sys.argv[1]), load(sys.argv[2])
    print("old: %s" % old["header"][0])
    print("     %s" % old.get("versions", {}).get("repo", "?"))
    print("new: %s" % new["header"][0])
    print("     %s" % new.get("versions", {}).get("repo", "?"))
    if old.get("plugin") != new.get("plugin"):
        print("NOTE: different plugin: %r vs %r" %
              (old.get("plugin"), new.get("plugin")))
    oc, nc = old.get("config", {}), new.get("config", {})
    diffs = ["%s %s->%s" % (k, oc.get(k), nc.get(k))
             for k in sorted(set(oc) | set(nc)) if oc.get(k) != nc.get(k)]
    if diffs:
        print("NOTE: config differs: " + ", ".join(diffs))
    om, nm = old.get("machine", {}), new.get("machine", {})
    if (om.get("cpu"), om.get("nproc")) != (nm.get("cpu"), nm.get("nproc")):
        print("NOTE: different machine: %s/%s vs %s/%s" % (
            om.get("nproc"), om.get("cpu"), nm.get("nproc"), nm.get("cpu")))
    print("change: + better, - worse, ~ within %.0f%% (noise)" % noise)
    print()
    print("%-2s %-9s %-6s %10s %10s %9s   %-15s %-15s %s" % (
        "", "server", "unit", "old", "new", "change", "p/qemu old->new",
        "p/raw old->new", "verdict old->new"))
    osum, nsum = old["summary"], new["summary"]
    for wid in sorted(set(osum) | set(nsum)):
        o, n = osum.get(wid), nsum.get(wid)
        if not o or not n:
            print("%-2s only in %s" % (wid, "old" if o else "new"))
            continue
        print("%-2s %s" % (wid, n["name"]))
        first = True
        for key, label in SERVERS:
            ov, nv = o["median"].get(key), n["median"].get(key)
            if ov is None and nv is None and key not in o["median"]:
                continue
            pct, mark = change(ov, nv, n["better"], noise)
            extra = ""
            if first:
                extra = "   %-15s %-15s %s -> %s" % (
                    "%s->%s" % (ratio(o["plugin_qemu"]),
                                ratio(n["plugin_qemu"])),
                    "%s->%s" % (ratio(o["plugin_raw"]),
                                ratio(n["plugin_raw"])),
                    o["verdict"], n["verdict"])
                first = False
            print("%-2s %-9s %-6s %10s %10s %8s %s%s" % (
                "", label, n["unit"], fmt(ov, n["unit"]),
                fmt(nv, n["unit"]), pct, mark, extra))


if __name__ == "__main__":
    main()
