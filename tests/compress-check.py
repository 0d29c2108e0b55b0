#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""write-check.py's randomised qemu-io workloads (unaligned writes,
disjoint aio writes that share clusters, zeroes, discards, flushes),
served with compress=true, compared with the same workload on a raw
file; qemu-img check must find no errors and no leaks after the clean
shutdown, and must count compressed clusters.

usage: compress-check.py CONFIG...   (SEED=n in the environment)
"""

import importlib.util
import json
import os
import random
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "write_check", os.path.join(here, "write-check.py"))
wc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wc)

MiB = wc.MiB
wc.CONFIGS.update({
    "zstd": ("compression_type=zstd", 64 * MiB, None),
    "c4k": ("cluster_size=4096", 16 * MiB, None),
    "c4k-zstd": ("cluster_size=4096,compression_type=zstd", 16 * MiB, None),
    "rc2": ("refcount_bits=2", 32 * MiB, None),
    "extl2-zstd": ("extended_l2=on,compression_type=zstd", 64 * MiB, None),
})

PlainServer = wc.Server
compressed_counts = {}


class CompressServer(PlainServer):
    def __init__(self, d, image, *args):
        super().__init__(d, image, "compress=true", *args)
        self.image = image

    def stop(self):
        super().stop()
        r = subprocess.run(["qemu-img", "check", "--output=json", self.image],
                           capture_output=True, text=True)
        compressed_counts[self.image] = json.loads(r.stdout).get(
            "compressed-clusters", 0)


wc.Server = CompressServer


def main():
    seed = int(os.environ.get("SEED", random.randrange(1 << 30)))
    print(f"seed={seed} (rerun with SEED={seed})", flush=True)
    ok = True
    for name in sys.argv[1:]:
        compressed_counts.clear()
        if not wc.one(name, seed):
            ok = False
            continue
        n = sum(compressed_counts.values())
        print(f"  {name}: {n} compressed clusters", flush=True)
        if n == 0:
            print(f"FAIL {name}: no compressed clusters written", flush=True)
            ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
