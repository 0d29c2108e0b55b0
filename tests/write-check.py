#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Randomised write test: one seeded qemu-io workload goes through the
plugin (over NBD) and onto a raw file; the results must be equal outside
discarded ranges, and `qemu-img check` must find no errors and, after a
clean shutdown, no leaks.

usage: write-check.py CONFIG...   (see CONFIGS; SEED=n in the environment)
"""

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

PLUGIN = os.environ["PLUGIN"]
# QCOW2_MODE=filter: serve through nbdkit-qcow2-filter.so over the file
# plugin instead (parameters prefixed qcow2-; backing and data files
# given explicitly; the image padded, since the export cannot grow).
FILTER_MODE = os.environ.get("QCOW2_MODE", "plugin") == "filter"
MiB = 1 << 20
GiB = 1 << 30


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


# name: (qemu-img create options, virtual size, extra set-up)
CONFIGS = {
    "v2": ("compat=0.10", 64 * MiB, None),
    "v3": ("compat=1.1", 64 * MiB, None),
    "c512": ("cluster_size=512", 8 * MiB, None),
    "c2M": ("cluster_size=2M", 256 * MiB, None),
    "rc1": ("refcount_bits=1", 64 * MiB, None),
    "rc64": ("refcount_bits=64", 64 * MiB, None),
    "rc1-c512": ("refcount_bits=1,cluster_size=512", 8 * MiB, None),
    "rc64-c512": ("refcount_bits=64,cluster_size=512", 8 * MiB, None),
    "extl2": ("extended_l2=on", 64 * MiB, None),
    "extl2-16k": ("extended_l2=on,cluster_size=16k", 32 * MiB, None),
    "extl2-2M": ("extended_l2=on,cluster_size=2M", 256 * MiB, None),
    "lazy": ("lazy_refcounts=on", 64 * MiB, None),
    "backing": ("compat=1.1", 64 * MiB, "backing"),
    "backing-v2": ("compat=0.10", 64 * MiB, "backing"),
    "backing-extl2": ("extended_l2=on", 64 * MiB, "backing"),
    "compressed": ("compat=1.1", 64 * MiB, "compressed"),
    "compressed-zstd": ("compression_type=zstd", 64 * MiB, "compressed"),
    "snapshot": ("compat=1.1", 64 * MiB, "snapshot"),
    "big": ("compat=1.1", 6 * GiB, None),
    "datafile": ("data_file=DATA", 64 * MiB, None),
    "prealloc": ("preallocation=metadata", 64 * MiB, None),
}


class Workload:
    """Seeded qemu-io commands, and which bytes they leave undefined."""

    def __init__(self, rng, size, cluster, nops, lo=0):
        self.cmds, self.undefined = [], []
        span = size - lo
        for _ in range(nops):
            kind = rng.choices(
                ["write", "write-aligned", "zero", "zero-unmap", "discard",
                 "write-fua", "aio", "flush"],
                [30, 15, 10, 8, 8, 6, 8, 3])[0]
            if kind == "flush":
                self.cmds.append("flush")
                continue
            big = rng.random() < 0.15
            length = rng.randint(1, 4 * MiB if big else 3 * cluster)
            off = lo + rng.randrange(0, span - length)
            if kind in ("write-aligned", "zero-unmap", "discard"):
                off -= off % cluster
                length = max(cluster, length - length % cluster)
                length = min(length, lo + span - off)
            pat = rng.randrange(1, 256)
            if kind in ("write", "write-aligned"):
                self.cmds.append(f"write -P {pat} {off} {length}")
            elif kind == "write-fua":
                self.cmds.append(f"write -f -P {pat} {off} {length}")
            elif kind == "zero":
                self.cmds.append(f"write -z {off} {length}")
            elif kind == "zero-unmap":
                self.cmds.append(f"write -z -u {off} {length}")
            elif kind == "aio":
                # aio requests run concurrently: keep them disjoint.
                n = rng.randint(2, 6)
                chunk = max(1, length // n)
                for i in range(n):
                    self.cmds.append(
                        f"aio_write -P {(pat + i) % 255 + 1} "
                        f"{off + i * chunk} {chunk}")
                self.cmds.append("aio_flush")
                length = n * chunk
            if kind == "discard":
                self.cmds.append(f"discard {off} {length}")
                self.undefined.append((off, off + length))
            else:
                self.define(off, off + length)
        self.cmds.append("flush")

    def define(self, a, b):
        out = []
        for (x, y) in self.undefined:
            if y <= a or x >= b:
                out.append((x, y))
                continue
            if x < a:
                out.append((x, a))
            if y > b:
                out.append((b, y))
        self.undefined = out

    def touched(self):
        spans = []
        for c in self.cmds:
            w = c.split()
            if len(w) >= 3 and w[-1].isdigit() and w[-2].isdigit():
                spans.append((int(w[-2]), int(w[-2]) + int(w[-1])))
        return spans


def qemu_io(target, cmds, fmt="raw"):
    args = ["qemu-io", "-f", fmt, target]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run(args, capture_output=True, text=True)
    bad = [l for l in (r.stdout + r.stderr).splitlines()
           if "error" in l.lower() or "failed" in l.lower()]
    if r.returncode != 0 or bad:
        raise RuntimeError(f"qemu-io on {target} failed: {bad[:3]}")


class Server:
    def __init__(self, d, image, *args):
        self.sock = os.path.join(d, "nbd.sock")
        self.pidfile = os.path.join(d, "nbdkit.pid")
        self.log = open(os.path.join(d, "nbdkit.log"), "w")
        for p in (self.sock, self.pidfile):
            if os.path.exists(p):
                os.unlink(p)
        serve = [PLUGIN, f"file={image}", *args]
        if FILTER_MODE:
            serve = [f"--filter={os.environ['FILTER']}", "file",
                     f"file={image}", *(f"qcow2-{a}" for a in args)]
            for key, path in (("backing", "base.qcow2"),
                              ("data-file", "test.data")):
                if os.path.exists(os.path.join(d, path)):
                    serve.append(f"qcow2-{key}={os.path.join(d, path)}")
        self.proc = subprocess.Popen(
            ["nbdkit", "-f", "-U", self.sock, "-P", self.pidfile, *serve],
            stderr=self.log)
        for _ in range(200):
            if os.path.exists(self.pidfile) and os.path.exists(self.sock):
                break
            if self.proc.poll() is not None:
                raise RuntimeError("nbdkit failed to start: " +
                                   open(self.log.name).read()[-2000:])
            time.sleep(0.05)
        self.pid = self.proc.pid
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def stop(self):
        self.proc.terminate()
        if self.proc.wait(timeout=60) != 0:
            raise RuntimeError("nbdkit exited with status %d" %
                               self.proc.returncode)

    def kill(self):
        self.proc.kill()
        self.proc.wait()


def compare(a, b, size, w, full):
    """Equal outside undefined ranges; big images: touched ranges only."""
    spans = [(0, size)] if full else [
        (max(0, x - 65536), min(size, y + 65536)) for x, y in w.touched()]
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for (x, y) in spans:
            pos = x
            while pos < y:
                n = min(4 * MiB, y - pos)
                fa.seek(pos)
                fb.seek(pos)
                da, db = fa.read(n), fb.read(n)
                da += bytes(n - len(da))
                db += bytes(n - len(db))
                if da != db:
                    for i in range(n):
                        if da[i] != db[i] and not any(
                                u <= pos + i < v for u, v in w.undefined):
                            return pos + i
                pos += n
    return None


def check_image(image, allow_leaks=False):
    r = subprocess.run(["qemu-img", "check", image], capture_output=True,
                       text=True)
    ok = r.returncode == 0 or (allow_leaks and r.returncode == 3)
    if not ok:
        raise RuntimeError(f"qemu-img check {image}: exit {r.returncode}\n"
                           f"{r.stdout[-3000:]}{r.stderr[-2000:]}")


def prepare(d, name, opts, size, extra, rng):
    img = os.path.join(d, "test.qcow2")
    raw = os.path.join(d, "test.raw")
    opts = opts.replace("DATA", os.path.join(d, "test.data"))
    if extra == "backing":
        base = os.path.join(d, "base.qcow2")
        compat = "compat=0.10" if "0.10" in opts else "compat=1.1"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", compat, base,
            str(size))
        qemu_io(base, Workload(rng, size, 65536, 40).cmds[:-1], "qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "-b",
            base, "-F", "qcow2", img, str(size))
    elif extra == "compressed":
        src = os.path.join(d, "src.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", src, str(size))
        qemu_io(src, [f"write -P {i + 1} {i * 3 * MiB} {2 * MiB}"
                      for i in range(size // (3 * MiB))], "qcow2")
        run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", opts, src, img)
    else:
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, img,
            str(size))
    if extra == "snapshot":
        qemu_io(img, Workload(rng, size, 65536, 30).cmds[:-1], "qcow2")
        run("qemu-img", "snapshot", "-c", "s1", img)
    run("qemu-img", "convert", "-O", "raw", img, raw)
    if FILTER_MODE:
        # Room for every cluster the workload may allocate (sparse).
        os.truncate(img, os.path.getsize(img) + size + 64 * MiB)
    return img, raw


def cluster_of(img):
    out = run("qemu-img", "info", img).stdout
    for l in out.splitlines():
        if l.startswith("cluster_size:"):
            return int(l.split(":")[1])
    return 65536


def one(name, seed):
    opts, size, extra = CONFIGS[name]
    rng = random.Random(f"{seed}-{name}")
    d = tempfile.mkdtemp(prefix=f"wc-{name}-")
    ok = False
    try:
        img, raw = prepare(d, name, opts, size, extra, rng)
        snap_before = None
        if extra == "snapshot":
            snap_before = os.path.join(d, "snap-before.raw")
            run("qemu-img", "convert", "-l", "snapshot.name=s1", "-O", "raw",
                img, snap_before)
        cs = cluster_of(img)
        lo = 4 * GiB - 8 * MiB if size > 4 * GiB else 0
        w = Workload(rng, size, cs, 120, lo)
        srv = Server(d, img)
        try:
            qemu_io(srv.uri, w.cmds)
        except RuntimeError as e:
            srv.stop()
            raise RuntimeError(f"{e}\n  server log: "
                               f"{open(srv.log.name).read()[-1500:]}")
        srv.stop()
        qemu_io(raw, w.cmds)
        check_image(img)
        out = os.path.join(d, "out.raw")
        run("qemu-img", "convert", "-O", "raw", img, out)
        bad = compare(out, raw, size, w, size <= 512 * MiB)
        if bad is not None:
            raise RuntimeError(f"content differs at offset {bad}")
        if snap_before:
            after = os.path.join(d, "snap-after.raw")
            run("qemu-img", "convert", "-l", "snapshot.name=s1", "-O", "raw",
                img, after)
            if open(after, "rb").read() != open(snap_before, "rb").read():
                raise RuntimeError("the snapshot's content changed")
        print(f"PASS {name}: {len(w.cmds)} commands, check clean, content "
              f"equal", flush=True)
        ok = True
        return True
    except Exception as e:
        print(f"FAIL {name} (seed {seed}): {e}", flush=True)
        print(f"  kept {d} for inspection", flush=True)
        return False
    finally:
        # A failure keeps its files (see above); a pass leaves nothing.
        if ok and os.environ.get("KEEP") is None:
            shutil.rmtree(d, ignore_errors=True)


def main():
    seed = int(os.environ.get("SEED", random.randrange(1 << 30)))
    print(f"seed={seed} (rerun with SEED={seed})", flush=True)
    names = sys.argv[1:] or list(CONFIGS)
    results = [one(n, seed) for n in names]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
