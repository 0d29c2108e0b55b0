#!/usr/bin/env python3
# nbdkit-qcow2 benchmark driver.
# SPDX-License-Identifier: BSD-3-Clause
#
# Runs the same fio / nbdcopy workloads against three servers -- the
# qcow2 plugin, qemu-nbd, and nbdkit's file plugin on the raw equivalent
# -- alternating between them, and writes a text report with the
# medians, the ratios and a PASS/MISS verdict against the targets.
# Standard library only.  Normally started by run-bench.sh (make bench);
# see bench/README.md for the knobs (all environment variables).

import datetime
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

MiB = 1 << 20
GiB = 1 << 30


# ---------------------------------------------------------------- config

def parse_size(s):
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(s))
    if not m:
        raise ValueError("bad size: %r" % s)
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30,
            "t": 1 << 40}[m.group(2).lower()]
    return int(m.group(1)) * mult


def fmt_size(n):
    for unit, mult in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20),
                       ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return "%d%s" % (n // mult, unit)
    return str(n)


class Config:
    def __init__(self):
        e = os.environ
        self.quick = e.get("QUICK", "0") not in ("", "0", "no")
        q = self.quick

        def get(name, full, quick):
            return e.get(name) or (quick if q else full)
        self.size = parse_size(get("SIZE", "1G", "128M"))
        self.wsize = parse_size(get("WSIZE", "2G", "256M"))
        self.reps = int(get("REPS", "3", "2"))
        self.runtime = int(get("RUNTIME", "5", "1"))
        self.ramp = int(get("RAMP", "1", "0"))
        self.iodepth = int(get("IODEPTH", "16", "16"))
        self.numjobs = int(get("NUMJOBS", "1", "1"))
        self.end_fsync = get("END_FSYNC", "0", "0") not in ("", "0")
        self.copy_flush = get("COPY_FLUSH", "0", "0") not in ("", "0")
        self.mem_size = parse_size(get("MEM_SIZE", "1T", "64G"))
        self.mem_writes = int(get("MEM_WRITES", "4096", "256"))
        self.mem_runtime = int(get("MEM_RUNTIME", str(self.runtime),
                                   str(self.runtime)))
        self.seed = int(get("SEED", "20261124", "20261124"))
        self.workloads = [w.strip() for w in
                          get("WORKLOADS", "a,b,c,d,e,f,g,h,i,j,k,l,m,cz,n,o,p,cv",
                              "a,b,c,d,e,f,g,h,i,j,k,l,m,cz,n,o,p,cv").split(",")
                          if w.strip()]
        self.standin = e.get("STANDIN", "")
        self.plugin = e.get("PLUGIN", "")
        self.plugin_args = e.get("PLUGIN_ARGS", "").split()
        # Workloads l and m: the filter over the file plugin.
        self.filter = e.get("FILTER") or os.path.join(
            os.path.dirname(self.plugin), "nbdkit-qcow2-filter.so")
        self.srcdir = e.get("BENCH_SRCDIR") or os.path.dirname(
            os.path.dirname(os.path.abspath(__file__)))
        self.results = e.get("RESULTS_DIR") or os.path.join(
            self.srcdir, "bench", "results")
        self.workdir = e.get("BENCH_WORKDIR", "")
        self.keep = e.get("KEEP", "0") not in ("", "0")
        self.slack = parse_size(e.get("RSS_SLACK", "64M"))
        self.l2_budget = parse_size(e.get("L2_BUDGET", "0")) or \
            self.default_l2_budget()
        if self.size < 16 * MiB or self.size % (64 * 1024):
            raise SystemExit("SIZE must be a multiple of 64K, >= 16M")

    def default_l2_budget(self):
        # Keep in step with the plugin's own default.
        try:
            with open(os.path.join(self.srcdir, "plugin", "qcow2.h")) as f:
                m = re.search(r"#define\s+Q2_DEFAULT_L2_CACHE\s+\(?\s*"
                              r"([\d\s*]+)\)?", f.read())
            if m:
                v = 1
                for part in m.group(1).split("*"):
                    v *= int(part)
                return v
        except (OSError, ValueError):
            pass
        return 32 * MiB

    def as_dict(self):
        return {
            "QUICK": int(self.quick), "SIZE": fmt_size(self.size),
            "WSIZE": fmt_size(self.wsize), "REPS": self.reps,
            "RUNTIME": self.runtime, "RAMP": self.ramp,
            "IODEPTH": self.iodepth, "NUMJOBS": self.numjobs,
            "END_FSYNC": int(self.end_fsync),
            "COPY_FLUSH": int(self.copy_flush),
            "MEM_SIZE": fmt_size(self.mem_size),
            "MEM_WRITES": self.mem_writes, "MEM_RUNTIME": self.mem_runtime,
            "SEED": self.seed, "STANDIN": self.standin or "-",
            "L2_BUDGET": fmt_size(self.l2_budget),
        }


T0 = time.monotonic()


def log(msg):
    print("[%5.0fs] %s" % (time.monotonic() - T0, msg), file=sys.stderr,
          flush=True)


def run(cmd, **kw):
    """Run a helper command, raising with its output on failure."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.STDOUT)
    r = subprocess.run(cmd, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (
            " ".join(cmd[:3]), r.returncode, (r.stdout or "")[-800:]))
    return r.stdout


def first_line(cmd):
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True).stdout
        return out.strip().splitlines()[0]
    except (OSError, IndexError):
        return "unknown"


# ---------------------------------------------------------------- servers

class Server:
    def __init__(self, name, procs, sock, logpath):
        self.name = name
        self.procs = procs          # front server last
        self.sock = sock
        self.logpath = logpath

    @property
    def pid(self):
        return self.procs[-1].pid

    def uri(self):
        return "nbd+unix:///?socket=" + self.sock


class Bench:
    SERVERS = ("plugin", "qemu", "raw")
    LABEL = {"plugin": "plugin", "qemu": "qemu-nbd", "raw": "raw",
             "filter": "filter"}

    def __init__(self, cfg):
        self.cfg = cfg
        self.live = []
        self.dirty = True       # our files may have unwritten data
        self.tools = []
        self.cleaning = False
        self.nserver = 0
        if cfg.workdir:
            self.wd = cfg.workdir
            os.makedirs(self.wd, exist_ok=True)
        else:
            import tempfile
            self.wd = tempfile.mkdtemp(prefix="nbdkit-qcow2-bench.",
                                       dir=os.environ.get("TMPDIR",
                                                          "/var/tmp"))
        self.logdir = os.path.join(self.wd, "logs")
        os.makedirs(self.logdir, exist_ok=True)
        self.img = {}
        self.results = {}
        self.notes = []
        self.plugin_desc = self.resolve_plugin()

    # -- which "plugin" -------------------------------------------------

    def resolve_plugin(self):
        c = self.cfg
        mode = c.standin
        if mode == "auto":
            filt = subprocess.run(
                ["nbdkit", "file", "--filter=qcow2dec", "--dump-plugin"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            mode = "qcow2dec" if filt.returncode == 0 else "nbd-proxy"
            c.standin = mode
        if mode == "qcow2dec":
            return "STAND-IN: nbdkit file --filter=qcow2dec (read-only)"
        if mode == "nbd-proxy":
            return ("STAND-IN: nbdkit nbd plugin -> private qemu-nbd "
                    "(not the plugin; harness exercise only)")
        if mode == "nbd-proxy-ro":
            return ("STAND-IN: nbdkit -r nbd plugin -> private qemu-nbd "
                    "(read-only; harness exercise only)")
        if mode:
            raise SystemExit("unknown STANDIN=%s" % mode)
        if not c.plugin or not os.path.exists(c.plugin):
            raise SystemExit(
                "plugin %r not found: build it (make) or set PLUGIN=, or "
                "STANDIN=auto to exercise the harness" % c.plugin)
        return c.plugin

    # -- process management ----------------------------------------------

    def write_pids(self):
        with open(os.path.join(self.wd, "pids"), "w") as f:
            for s in self.live:
                for p in s.procs:
                    f.write("%d\n" % p.pid)
            for p in self.tools:
                f.write("%d\n" % p.pid)

    def spawn(self, cmd, logpath):
        lf = open(logpath, "ab")
        lf.write(("+ " + " ".join(cmd) + "\n").encode())
        lf.flush()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=lf,
                             stderr=subprocess.STDOUT)
        lf.close()
        return p

    def wait_ready(self, proc, sock, logpath, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("server exited (%d): %s" % (
                    proc.returncode, tail(logpath)))
            if os.path.exists(sock):
                try:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(2)
                    s.connect(sock)
                    magic = s.recv(8)
                    s.close()
                    if magic == b"NBDMAGIC":
                        return
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError("server not ready after %ds: %s" %
                           (timeout, tail(logpath)))

    def qemu_cmd(self, img, ro, sock, enc=False):
        cmd = ["qemu-nbd", "-f", "qcow2", "--cache=writeback",
               "--aio=threads", "--shared=16", "--persistent",
               "--socket=" + sock]
        if ro:
            cmd.append("--read-only")
        if enc:
            # An encrypted image: the secret, and the image as options.
            cmd.remove("-f")
            cmd.remove("qcow2")
            return cmd + ["--object", "secret,id=s0,file=" + self.pwfile(),
                          "--image-opts",
                          "driver=qcow2,file.filename=%s,"
                          "encrypt.key-secret=s0" % img]
        return cmd + [img]

    def pwfile(self):
        """The password of the encrypted (LUKS) images."""
        path = self.path("luks.pw")
        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write("bench-secret")
        return path

    def make_luks(self, path, src=None, size=None):
        """A LUKS (aes-256-xts-plain64) qcow2 image, converted from src
        or empty of the given size.  qemu-img with LUKS fails now and then
        under load ("Unable to get accurate CPU usage"): retry."""
        sec = ["--object", "secret,id=s0,file=" + self.pwfile(), "-o",
               "encrypt.format=luks,encrypt.key-secret=s0,"
               "encrypt.iter-time=100"]
        if src:
            cmd = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"] + \
                sec + [src, path]
        else:
            cmd = ["qemu-img", "create", "-q", "-f", "qcow2"] + sec + \
                [path, str(size)]
        for i in range(8):
            try:
                run(cmd)
                return
            except Exception:
                if i == 7:
                    raise
                time.sleep(0.2)

    def start(self, kind, img, ro, extra_args=(), enc=False):
        """Start server KIND on IMG; ro: export read-only; extra_args:
        more plugin parameters (the plugin only); enc: the image is
        encrypted with the password of pwfile()."""
        # Write back dirty pages left by earlier runs (and image
        # preparation) now, outside the timing, not during this run.
        if self.dirty:
            self.sync_files()
            self.dirty = False
        self.nserver += 1
        sock = os.path.join(self.wd, "s%d-%s.sock" % (self.nserver, kind))
        logpath = os.path.join(self.logdir, "%s.log" % kind)
        rflag = ["-r"] if ro else []
        procs = []
        srv = Server(kind, procs, sock, logpath)
        self.live.append(srv)
        try:
            if kind == "qemu":
                procs.append(self.spawn(self.qemu_cmd(img, ro, sock, enc),
                                        logpath))
            elif kind == "raw":
                procs.append(self.spawn(
                    ["nbdkit", "-f", "-U", sock] + rflag + ["file", img],
                    logpath))
            elif kind == "filter":
                procs.append(self.spawn(
                    ["nbdkit", "-f", "-U", sock] + rflag +
                    ["--filter=" + self.cfg.filter, "file", "file=" + img] +
                    ["qcow2-" + a for a in self.cfg.plugin_args], logpath))
            elif self.cfg.standin == "qcow2dec":
                procs.append(self.spawn(
                    ["nbdkit", "-f", "-U", sock, "-r", "file", img,
                     "--filter=qcow2dec"], logpath))
            elif self.cfg.standin.startswith("nbd-proxy"):
                back = sock + ".back"
                procs.append(self.spawn(self.qemu_cmd(img, ro, back),
                                        logpath))
                self.write_pids()
                self.wait_ready(procs[0], back, logpath)
                if self.cfg.standin == "nbd-proxy-ro":
                    rflag = ["-r"]
                procs.append(self.spawn(
                    ["nbdkit", "-f", "-U", sock] + rflag +
                    ["nbd", "socket=" + back], logpath))
            else:
                procs.append(self.spawn(
                    ["nbdkit", "-f", "-U", sock] + rflag +
                    [self.cfg.plugin, "file=" + img] + self.cfg.plugin_args +
                    list(extra_args) +
                    (["password=+" + self.pwfile()] if enc else []),
                    logpath))
            self.write_pids()
            self.wait_ready(procs[-1], sock, logpath)
        except BaseException:
            self.stop(srv)
            raise
        return srv

    def stop(self, srv, discard=False):
        """Stop a server.  discard: its image is about to be deleted, so
        kill it at once rather than have it flush gigabytes of data that
        nobody will read to a shared disk."""
        for p in reversed(srv.procs):
            if p.poll() is None:
                if discard:
                    p.kill()
                else:
                    p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if srv in self.live:
            self.live.remove(srv)
        self.write_pids()
        for path in (srv.sock, srv.sock + ".back"):
            try:
                os.unlink(path)
            except OSError:
                pass

    def run_tool(self, cmd, timeout):
        """Run a client (fio, nbdcopy, qemu-img); on timeout or signal
        ask it to stop (SIGTERM), then kill it."""
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        self.tools.append(p)
        self.write_pids()
        try:
            out, _ = p.communicate(timeout=timeout)
        except BaseException:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            raise
        finally:
            self.tools.remove(p)
            self.write_pids()
        return subprocess.CompletedProcess(cmd, p.returncode, out, None)

    def cleanup(self):
        self.cleaning = True
        for srv in list(self.live):
            try:
                self.stop(srv)
            except Exception:
                for p in srv.procs:
                    try:
                        p.kill()
                    except OSError:
                        pass
        if not self.cfg.keep:
            shutil.rmtree(self.wd, ignore_errors=True)

    # -- images -----------------------------------------------------------

    def sync_files(self):
        """fsync our own files only: sync(2) would also wait for every
        other writer on this shared machine."""
        for name in os.listdir(self.wd):
            p = os.path.join(self.wd, name)
            if os.path.isfile(p) and not os.path.islink(p):
                try:
                    fd = os.open(p, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                except OSError:
                    pass

    def path(self, name):
        return os.path.join(self.wd, name)

    def make_images(self, need):
        c = self.cfg
        rng = random.Random(c.seed)
        t0 = time.time()
        if need & set(["a", "b", "c", "f", "g", "h", "cz", "l", "m", "n", "p", "cv"]):
            self.make_data(rng)
        if need & set("abgfhlm"):
            log("prep: full.qcow2 (qemu-img convert -O qcow2)")
            self.img["full"] = self.path("full.qcow2")
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                 self.img["data"], self.img["full"]])
        if "c" in need:
            log("prep: comp.qcow2 (qemu-img convert -c -O qcow2, zlib)")
            self.img["comp"] = self.path("comp.qcow2")
            run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2",
                 "-o", "compression_type=zlib", self.img["data"],
                 self.img["comp"]])
        if "f" in need:
            log("prep: ow.qcow2 / ow.raw (copies for overwrite)")
            self.img["ow"] = self.path("ow.qcow2")
            self.img["ow_raw"] = self.path("ow.raw")
            shutil.copyfile(self.img["full"], self.img["ow"])
            shutil.copyfile(self.img["data"], self.img["ow_raw"])
        if need & set(["n", "p"]):
            log("prep: luks.qcow2 (qemu-img convert, LUKS aes-256-xts)")
            self.img["luks"] = self.path("luks.qcow2")
            self.make_luks(self.img["luks"], src=self.img["data"])
        if "g" in need:
            self.make_chain(rng)
        if "i" in need:
            self.make_big(rng)
        if need & set("jk"):
            self.make_nbd_overlay(rng)
        for k in ("full", "comp"):
            if k in self.img:
                self.notes.append("%s.qcow2: %.0f MiB on disk" % (
                    k, os.path.getsize(self.img[k]) / MiB))
        log("prep: done in %.0fs" % (time.time() - t0))

    def make_data(self, rng):
        """SIZE bytes, no zero blocks: 7 in 8 clusters of compressible
        word text, 1 in 8 of random bytes (so a compressed image holds a
        mix of compressed and plain clusters)."""
        c = self.cfg
        log("prep: data.raw (%s, seed %d)" % (fmt_size(c.size), c.seed))
        letters = "abcdefghijklmnopqrstuvwxyz"
        vocab = ["".join(rng.choice(letters)
                         for _ in range(rng.randint(2, 10)))
                 for _ in range(3000)]
        text = " ".join(rng.choices(vocab, k=600000)).encode()
        pool = (text * (1 + (4 * MiB) // len(text)))[:4 * MiB]
        cl = 65536
        self.img["data"] = self.path("data.raw")
        with open(self.img["data"], "wb") as f:
            for i in range(c.size // cl):
                if rng.randrange(8) == 0:
                    f.write(rng.randbytes(cl))
                else:
                    off = rng.randrange(len(pool) - cl)
                    f.write(pool[off:off + cl])

    def make_nbd_overlay(self, rng):
        """An empty overlay on SIZE bytes of data exported by nbdkit file
        on a Unix socket (workloads j, k): every read goes to the NBD
        backing server, which runs for the rest of the benchmark."""
        if "data" not in self.img:
            self.make_data(rng)
        sock = self.path("nbd-backing.sock")
        logpath = os.path.join(self.logdir, "nbd-backing.log")
        log("prep: nbdov.qcow2 (empty overlay on nbd+unix backing, "
            "nbdkit file data.raw)")
        srv = Server("nbd-backing", [], sock, logpath)
        self.live.append(srv)
        srv.procs.append(self.spawn(["nbdkit", "-f", "-r", "-U", sock,
                                     "file", self.img["data"]], logpath))
        self.write_pids()
        self.wait_ready(srv.procs[-1], sock, logpath)
        self.img["nbdov"] = self.path("nbdov.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b",
             srv.uri(), "-F", "raw", self.img["nbdov"], str(self.cfg.size)])

    def qemu_io(self, img, fmt, cmds):
        for i in range(0, len(cmds), 1000):
            args = ["qemu-io", "-f", fmt]
            for cm in cmds[i:i + 1000]:
                args += ["-c", cm]
            run(args + [img])

    def make_chain(self, rng):
        c = self.cfg
        log("prep: backing chain top.qcow2 -> mid.qcow2 -> full.qcow2")
        base, mid, top = self.img["full"], self.path("mid.qcow2"), \
            self.path("top.qcow2")
        run(["qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "qcow2",
             mid])
        run(["qemu-img", "create", "-f", "qcow2", "-b", mid, "-F", "qcow2",
             top])
        # mid: ~25% in 256K extents; top: ~10% in 64K clusters plus some
        # 4K partial-cluster writes (copy-on-write from below).
        cmds = []
        for _ in range(c.size // 4 // (256 * 1024)):
            off = rng.randrange(c.size // 65536 - 4) * 65536
            cmds.append("write -q -P 0x%02x %d 256k" %
                        (rng.randrange(1, 256), off))
        self.qemu_io(mid, "qcow2", cmds)
        cmds = []
        for _ in range(c.size // 10 // 65536):
            off = rng.randrange(c.size // 65536) * 65536
            if rng.randrange(4) == 0:
                off += rng.randrange(16) * 4096
                ln = "4k"
            else:
                ln = "64k"
            cmds.append("write -q -P 0x%02x %d %s" %
                        (rng.randrange(1, 256), off, ln))
        self.qemu_io(top, "qcow2", cmds)
        self.img["top"] = top
        self.img["chain_raw"] = self.path("chain.raw")
        run(["qemu-img", "convert", "-O", "raw", top, self.img["chain_raw"]])
        self.notes.append(
            "chain: qemu-img create -f qcow2 -b full.qcow2 -F qcow2 "
            "mid.qcow2; -b mid.qcow2 -F qcow2 top.qcow2; mid %.0f MiB, "
            "top %.0f MiB on disk" % (os.path.getsize(mid) / MiB,
                                      os.path.getsize(top) / MiB))

    def make_big(self, rng):
        c = self.cfg
        log("prep: big.qcow2 (%s sparse, %d scattered 4K writes)" %
            (fmt_size(c.mem_size), c.mem_writes))
        big, bigraw = self.path("big.qcow2"), self.path("big.raw")
        run(["qemu-img", "create", "-f", "qcow2", big, str(c.mem_size)])
        slot = c.mem_size // c.mem_writes
        writes = []
        for i in range(c.mem_writes):
            off = i * slot + rng.randrange(max(1, slot // 65536)) * 65536
            writes.append((off, rng.randrange(1, 256)))
        self.qemu_io(big, "qcow2", ["write -q -P 0x%02x %d 4k" % (p, o)
                                    for o, p in writes])
        with open(bigraw, "wb") as f:
            f.truncate(c.mem_size)
            for o, p in writes:
                f.seek(o)
                f.write(bytes([p]) * 4096)
        self.img["big"], self.img["big_raw"] = big, bigraw
        self.notes.append("big.qcow2: %s virtual, %.0f MiB on disk" % (
            fmt_size(c.mem_size), os.path.getsize(big) / MiB))

    def warm(self, *paths):
        """Read files once so every server starts from the page cache."""
        for p in paths:
            with open(p, "rb") as f:
                while f.read(8 * MiB):
                    pass

    # -- fio --------------------------------------------------------------

    def fio(self, srv, wl, runtime=None):
        c = self.cfg
        runtime = runtime or c.runtime
        out = self.path("fio.json")
        cmd = ["fio", "--name=" + wl["id"], "--ioengine=nbd",
               "--uri=" + srv.uri(), "--rw=" + wl["rw"], "--bs=" + wl["bs"],
               "--iodepth=%d" % c.iodepth, "--numjobs=%d" % c.numjobs,
               "--group_reporting", "--runtime=%d" % runtime,
               "--randseed=%d" % c.seed, "--random_generator=tausworthe64",
               "--thread", "--output-format=json", "--output=" + out]
        if wl.get("timed", True):
            cmd += ["--time_based", "--ramp_time=%d" % c.ramp]
        if wl["rw"].startswith("rand") and wl.get("norandommap", True):
            cmd.append("--norandommap")
        if "write" in wl["rw"] and c.end_fsync:
            cmd.append("--end_fsync=1")
        if os.path.exists(out):
            os.unlink(out)
        r = self.run_tool(cmd, runtime + c.ramp + 300)
        txt = ""
        if os.path.exists(out):
            with open(out) as f:
                txt = f.read()
        j = None
        if "{" in txt:
            try:
                j = json.loads(txt[txt.index("{"):])
            except ValueError:
                j = None
        err = j["jobs"][0].get("error", 0) if j else -1
        if r.returncode != 0 or err:
            msg = (r.stdout + txt[:txt.find("{")] if "{" in txt else
                   r.stdout + txt)
            why = os.strerror(err) if isinstance(err, int) and err > 0 \
                else "no result"
            raise RuntimeError("fio rc=%d error=%s (%s) %s" % (
                r.returncode, err, why, " ".join(msg.split())[-300:]))
        d = j["jobs"][0]["write" if "write" in wl["rw"] else "read"]
        if d["io_bytes"] == 0:
            raise RuntimeError("fio did no I/O")
        return {"iops": d["iops"], "mibs": d["bw_bytes"] / MiB}

    # -- workloads --------------------------------------------------------

    def order(self, rep, servers):
        """Round-robin, rotating the starting server each repetition."""
        k = rep % len(servers)
        return list(servers[k:]) + list(servers[:k])

    def record(self, wid, kind, rep, value, extra=None, error=None):
        now = time.monotonic()
        took = now - getattr(self, "last_record", now)
        self.last_record = now
        r = self.results[wid]["runs"].setdefault(kind, [])
        r.append({"rep": rep, "value": value, "error": error,
                  **(extra or {})})
        if error:
            log("  [%s rep %d] %-8s (%4.1fs) n/a: %s" % (wid, rep + 1,
                                               self.LABEL.get(kind, kind),
                                               took, error[:200]))
        else:
            log("  [%s rep %d] %-8s (%4.1fs) %.1f %s" % (
                wid, rep + 1, self.LABEL.get(kind, kind), took, value,
                self.results[wid]["unit"]))

    def fio_workload(self, wl):
        c = self.cfg
        wid = wl["id"]
        unit = "IOPS" if wl["metric"] == "iops" else "MiB/s"
        self.results[wid] = {"name": wl["name"], "unit": unit,
                             "better": "higher", "runs": {}}
        log("workload %s: %s" % (wid, wl["name"]))
        if not wl.get("fresh"):
            self.warm(self.img[wl["qcow2"]], self.img[wl["raw"]])
        self.last_record = time.monotonic()
        for rep in range(c.reps):
            for kind in self.order(rep, wl.get("servers", self.SERVERS)):
                srv = None
                tmp = None
                try:
                    if wl.get("fresh"):
                        if kind == "raw":
                            tmp = self.path("fresh.raw")
                            with open(tmp, "wb") as f:
                                f.truncate(c.wsize)
                        else:
                            tmp = self.path("fresh.qcow2")
                            if wl.get("enc"):
                                self.make_luks(tmp, size=c.wsize)
                            else:
                                run(["qemu-img", "create", "-f", "qcow2",
                                     tmp, str(c.wsize)])
                        img = tmp
                    else:
                        img = self.img[wl["qcow2" if kind != "raw"
                                          else "raw"]]
                    srv = self.start(kind, img, wl["ro"],
                                     wl.get("plugin_args", ()),
                                     wl.get("enc", False) and kind != "raw")
                    self.dirty = self.dirty or not wl["ro"]
                    m = self.fio(srv, wl)
                    self.record(wid, kind, rep, m[wl["metric"]], m)
                except Exception as e:
                    self.record(wid, kind, rep, None, error=str(e))
                finally:
                    if srv:
                        self.stop(srv, discard=bool(tmp))
                    if tmp and os.path.exists(tmp):
                        os.unlink(tmp)

    def copy_workload(self):
        c = self.cfg
        wid = "h"
        self.results[wid] = {"name": "full-image copy to raw (seconds)",
                             "unit": "s", "better": "lower", "runs": {}}
        log("workload h: full-image copy")
        src, data = self.img["full"], self.img["data"]
        self.warm(src, data)
        self.last_record = time.monotonic()
        out = self.path("copy-out.raw")
        for rep in range(c.reps):
            for kind in self.order(rep, ("plugin", "qemu", "raw",
                                         "qemu-img")):
                srv = None
                try:
                    if os.path.exists(out):
                        os.unlink(out)
                    if kind == "qemu-img" and self.dirty:
                        self.sync_files()
                        self.dirty = False
                        cmd = ["qemu-img", "convert", "-f", "qcow2",
                               "-O", "raw", src, out]
                        if not c.copy_flush:
                            cmd[2:2] = ["-t", "unsafe"]
                    else:
                        srv = self.start(kind, data if kind == "raw"
                                         else src, True)
                        cmd = ["nbdcopy", srv.uri(), out]
                        if c.copy_flush:
                            cmd.insert(1, "--flush")
                    t0 = time.monotonic()
                    r = self.run_tool(cmd, 900)
                    dt = time.monotonic() - t0
                    if r.returncode != 0:
                        raise RuntimeError("%s failed (%d): %s" % (
                            cmd[0], r.returncode, r.stdout[-300:]))
                    if rep == 0:
                        # A benchmark of wrong data is worthless.
                        r = subprocess.run(["cmp", "-s", data, out])
                        if r.returncode != 0:
                            raise RuntimeError("copied image differs "
                                               "from the raw data")
                    self.record(wid, kind, rep, dt)
                except Exception as e:
                    self.record(wid, kind, rep, None, error=str(e))
                finally:
                    if srv:
                        self.stop(srv)
                    if os.path.exists(out):
                        os.unlink(out)

    def mem_workload(self):
        c = self.cfg
        wid = "i"
        self.results[wid] = {
            "name": "peak RSS, 4k randread over %s sparse image" %
                    fmt_size(c.mem_size),
            "unit": "MiB", "better": "lower", "runs": {}}
        log("workload i: memory")
        self.warm(self.img["big"])
        self.last_record = time.monotonic()
        wl = {"id": "i", "rw": "randread", "bs": "4k"}
        for rep in range(c.reps):
            for kind in self.order(rep, self.SERVERS):
                srv = None
                try:
                    srv = self.start(kind, self.img["big_raw" if kind == "raw"
                                                    else "big"], True)
                    base = proc_status(srv.pid, "VmRSS")
                    m = self.fio(srv, wl, runtime=c.mem_runtime)
                    hwm = proc_status(srv.pid, "VmHWM")
                    self.record(wid, kind, rep, hwm / 1024.0,
                                {"iops": m["iops"],
                                 "start_rss_mib": base / 1024.0})
                except Exception as e:
                    self.record(wid, kind, rep, None, error=str(e))
                finally:
                    if srv:
                        self.stop(srv)


    # -- cz: virt-v2v's -oo compressed output pipeline --------------------

    def make_mixed(self):
        """The mixed disk of workload cz: data.raw with every 8th MiB
        written as zeros and every 8th (another) left a hole."""
        c = self.cfg
        log("prep: mixed.raw (data.raw with zeros and holes)")
        self.img["mixed"] = self.path("mixed.raw")
        with open(self.img["data"], "rb") as src, \
                open(self.img["mixed"], "wb") as dst:
            for i in range(c.size // MiB):
                chunk = src.read(MiB)
                if i % 8 == 3:
                    dst.write(bytes(MiB))
                elif i % 8 == 6:
                    dst.seek(MiB, 1)
                else:
                    dst.write(chunk)
            dst.truncate(c.size)

    def compress_copy_workload(self):
        """nbdcopy --flush of a mixed raw disk into a fresh qcow2 made by
        qemu-img create: the plugin with compress=true against qemu-nbd
        through qemu's compress driver (what virt-v2v -oo compressed
        runs), and nbdkit's file plugin on a sparse raw file (the limit,
        without compression).  Seconds, and the size of the output."""
        c = self.cfg
        wid = "cz"
        self.results[wid] = {
            "name": "nbdcopy into compressed qcow2 (seconds)",
            "unit": "s", "better": "lower", "runs": {}}
        log("workload cz: nbdcopy into a compressed qcow2")
        if "mixed" not in self.img:
            self.make_mixed()
        src = self.img["mixed"]
        self.warm(src)
        self.last_record = time.monotonic()
        for rep in range(c.reps):
            for kind in self.order(rep, self.SERVERS):
                srv = None
                out = self.path("cz-out." + ("raw" if kind == "raw"
                                             else "qcow2"))
                try:
                    if kind == "raw":
                        with open(out, "wb") as f:
                            f.truncate(c.size)
                    else:
                        run(["qemu-img", "create", "-f", "qcow2", out,
                             str(c.size)])
                    srv = self.start_compressed(kind, out)
                    cmd = ["nbdcopy", "--flush", src, srv.uri()]
                    t0 = time.monotonic()
                    r = self.run_tool(cmd, 900)
                    dt = time.monotonic() - t0
                    if r.returncode != 0:
                        raise RuntimeError("nbdcopy failed (%d): %s" % (
                            r.returncode, r.stdout[-300:]))
                    self.stop(srv)
                    srv = None
                    size = os.stat(out).st_blocks * 512
                    if kind != "raw":
                        size = os.path.getsize(out)
                    if rep == 0 and kind != "raw":
                        # A benchmark of wrong data is worthless.
                        r = subprocess.run(
                            ["qemu-img", "compare", "-q", "-f", "raw", "-F",
                             "qcow2", src, out])
                        if r.returncode != 0:
                            raise RuntimeError("the compressed copy differs "
                                               "from the source")
                    self.record(wid, kind, rep, dt, {"size": size})
                except Exception as e:
                    self.record(wid, kind, rep, None, error=str(e))
                finally:
                    if srv:
                        self.stop(srv, discard=True)
                    if os.path.exists(out):
                        os.unlink(out)

    # -- cv, cvz: virt-v2v's output pipeline, image creation included ----

    def create_pipeline_workload(self):
        """virt-v2v's qcow2 output end to end: create the image, serve
        it, nbdcopy --flush the mixed disk into it, stop the server.
        The plugin does it all with create=true (cvz: and compress=true);
        qemu runs qemu-img create, then qemu-nbd (cvz: through the
        compress driver).  Seconds from before the creation until the
        server has exited; also the setup time (creation and server
        start) and the output size."""
        c = self.cfg
        if "mixed" not in self.img:
            self.make_mixed()
        src = self.img["mixed"]
        self.warm(src)
        for wid, compress in (("cv", False), ("cvz", True)):
            self.results[wid] = {
                "name": "create + nbdcopy%s (seconds)" % (
                    ", compressed" if compress else ""),
                "unit": "s", "better": "lower", "runs": {}}
            log("workload %s: create=true and nbdcopy%s" % (
                wid, " with compression" if compress else ""))
            self.last_record = time.monotonic()
            for rep in range(c.reps):
                for kind in self.order(rep, ("plugin", "qemu")):
                    srv = None
                    out = self.path(wid + "-out.qcow2")
                    try:
                        t0 = time.monotonic()
                        if kind == "plugin":
                            extra = ["create=true", "size=%d" % c.size]
                            if compress:
                                extra.append("compress=true")
                            srv = self.start(kind, out, False, extra)
                        else:
                            run(["qemu-img", "create", "-q", "-f", "qcow2",
                                 out, str(c.size)])
                            srv = (self.start_compressed(kind, out)
                                   if compress else
                                   self.start(kind, out, False))
                        setup = time.monotonic() - t0
                        r = self.run_tool(["nbdcopy", "--flush", src,
                                           srv.uri()], 900)
                        if r.returncode != 0:
                            raise RuntimeError("nbdcopy failed (%d): %s" % (
                                r.returncode, r.stdout[-300:]))
                        self.stop(srv)
                        srv = None
                        dt = time.monotonic() - t0
                        size = os.path.getsize(out)
                        if rep == 0:
                            r = subprocess.run(
                                ["qemu-img", "compare", "-q", "-f", "raw",
                                 "-F", "qcow2", src, out])
                            if r.returncode != 0:
                                raise RuntimeError("the copy differs from "
                                                   "the source")
                        self.record(wid, kind, rep, dt,
                                    {"size": size, "setup": setup})
                    except Exception as e:
                        self.record(wid, kind, rep, None, error=str(e))
                    finally:
                        if srv:
                            self.stop(srv, discard=True)
                        if os.path.exists(out):
                            os.unlink(out)

    def start_compressed(self, kind, img):
        """A server writing compressed clusters into IMG (raw: plain)."""
        if kind == "plugin" and not self.cfg.standin:
            saved = self.cfg.plugin_args
            self.cfg.plugin_args = saved + ["compress=true"]
            try:
                return self.start(kind, img, False)
            finally:
                self.cfg.plugin_args = saved
        if kind != "qemu":
            return self.start(kind, img, False)
        if self.dirty:
            self.sync_files()
            self.dirty = False
        self.nserver += 1
        sock = os.path.join(self.wd, "s%d-%s.sock" % (self.nserver, kind))
        logpath = os.path.join(self.logdir, "%s.log" % kind)
        procs = []
        srv = Server(kind, procs, sock, logpath)
        self.live.append(srv)
        try:
            procs.append(self.spawn(
                ["qemu-nbd", "--cache=writeback", "--aio=threads",
                 "--shared=16", "--persistent", "--socket=" + sock,
                 "--image-opts",
                 "driver=compress,file.driver=qcow2,file.file.driver=file,"
                 "file.file.filename=" + img], logpath))
            self.write_pids()
            self.wait_ready(procs[-1], sock, logpath)
        except BaseException:
            self.stop(srv)
            raise
        return srv


def proc_status(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])       # kB
    raise RuntimeError("no %s for pid %d" % (field, pid))


def tail(path, n=600):
    try:
        with open(path, errors="replace") as f:
            return " ".join(f.read()[-n:].split())
    except OSError:
        return ""


FIO_WORKLOADS = [
    {"id": "a", "name": "4k random read, allocated", "rw": "randread",
     "bs": "4k", "metric": "iops", "qcow2": "full", "raw": "data",
     "ro": True},
    {"id": "b", "name": "1M seq read, allocated", "rw": "read",
     "bs": "1M", "metric": "mibs", "qcow2": "full", "raw": "data",
     "ro": True},
    {"id": "c", "name": "1M seq read, zlib-compressed image", "rw": "read",
     "bs": "1M", "metric": "mibs", "qcow2": "comp", "raw": "data",
     "ro": True},
    {"id": "d", "name": "4k random write, allocating (fresh image)",
     "rw": "randwrite", "bs": "4k", "metric": "iops", "fresh": True,
     "ro": False, "timed": False, "norandommap": False},
    {"id": "e", "name": "1M seq write, allocating (fresh image)",
     "rw": "write", "bs": "1M", "metric": "mibs", "fresh": True,
     "ro": False, "timed": False},
    {"id": "f", "name": "4k random overwrite, allocated", "rw": "randwrite",
     "bs": "4k", "metric": "iops", "qcow2": "ow", "raw": "ow_raw",
     "ro": False},
    {"id": "g", "name": "4k random read, 2-level backing chain",
     "rw": "randread", "bs": "4k", "metric": "iops", "qcow2": "top",
     "raw": "chain_raw", "ro": True},
    {"id": "j", "name": "4k random read, empty overlay on NBD backing",
     "rw": "randread", "bs": "4k", "metric": "iops", "qcow2": "nbdov",
     "raw": "data", "ro": True,
     "plugin_args": ["allow-remote-backing=true"]},
    {"id": "k", "name": "1M seq read, empty overlay on NBD backing",
     "rw": "read", "bs": "1M", "metric": "mibs", "qcow2": "nbdov",
     "raw": "data", "ro": True,
     "plugin_args": ["allow-remote-backing=true"]},
    # The filter (nbdkit --filter=qcow2 file IMG) against the plugin on
    # the same image, alternated.
    {"id": "l", "name": "4k random read, allocated, filter vs plugin",
     "rw": "randread", "bs": "4k", "metric": "iops", "qcow2": "full",
     "raw": "data", "ro": True, "servers": ("filter", "plugin")},
    {"id": "m", "name": "1M seq read, allocated, filter vs plugin",
     "rw": "read", "bs": "1M", "metric": "mibs", "qcow2": "full",
     "raw": "data", "ro": True, "servers": ("filter", "plugin")},
    # Encrypted (LUKS aes-256-xts-plain64); qemu-nbd gets the secret.
    {"id": "n", "name": "1M seq read, LUKS aes-256-xts", "rw": "read",
     "bs": "1M", "metric": "mibs", "qcow2": "luks", "raw": "data",
     "ro": True, "enc": True},
    {"id": "o", "name": "1M seq write, LUKS, allocating (fresh)",
     "rw": "write", "bs": "1M", "metric": "mibs", "fresh": True,
     "ro": False, "timed": False, "enc": True},
    {"id": "p", "name": "4k random read, LUKS aes-256-xts",
     "rw": "randread", "bs": "4k", "metric": "iops", "qcow2": "luks",
     "raw": "data", "ro": True, "enc": True},
]


# ---------------------------------------------------------------- report

def median(runs):
    vals = [r["value"] for r in runs or [] if r["value"] is not None]
    return statistics.median(vals) if vals else None


def summarize(bench):
    c = bench.cfg
    summary = {}
    for wid, res in bench.results.items():
        med = {k: median(v) for k, v in res["runs"].items()}
        p, q, r = med.get("plugin"), med.get("qemu"), med.get("raw")
        s = {"name": res["name"], "unit": res["unit"],
             "better": res["better"], "median": med,
             "plugin_qemu": p / q if p and q else None,
             "plugin_raw": p / r if p and r else None}
        # Targets.
        verdict, target = None, ""
        if wid == "a":
            target = "p/q>=1.5, p/raw>=0.7"
            if s["plugin_qemu"] is not None and s["plugin_raw"] is not None:
                verdict = s["plugin_qemu"] >= 1.5 and s["plugin_raw"] >= 0.7
        elif wid in ("n", "o"):
            target = "p/q>=1.2"
            if s["plugin_qemu"] is not None:
                verdict = s["plugin_qemu"] >= 1.2
        elif wid in "bcdef":
            target = "p/q>=1.0"
            if s["plugin_qemu"] is not None:
                verdict = s["plugin_qemu"] >= 1.0
        elif wid in ("j", "k"):
            target = "p/q>=1.2"
            if s["plugin_qemu"] is not None:
                verdict = s["plugin_qemu"] >= 1.2
        elif wid == "h":
            qi = med.get("qemu-img")
            target = "p<=qemu-img %s" % ("%.2fs" % qi if qi else "n/a")
            if p and qi:
                verdict = p <= qi
                s["plugin_qemuimg"] = p / qi
        elif wid == "cv":
            target = "time p/q<=1.0"
            if s["plugin_qemu"] is not None:
                verdict = s["plugin_qemu"] <= 1.0
            s["setup"] = {k: statistics.median([r["setup"] for r in v
                                                if r.get("setup") is not None])
                          for k, v in res["runs"].items()
                          if any(r.get("setup") is not None for r in v)}
        elif wid in ("cz", "cvz"):
            sizes = {k: statistics.median([r["size"] for r in v
                                           if r.get("size")])
                     for k, v in res["runs"].items()
                     if any(r.get("size") for r in v)}
            s["sizes"] = sizes
            sp, sq = sizes.get("plugin"), sizes.get("qemu")
            s["size_ratio"] = sp / sq if sp and sq else None
            target = "time p/q<=1.0, size p/q<=1.05"
            if s["plugin_qemu"] is not None and s["size_ratio"] is not None:
                verdict = s["plugin_qemu"] <= 1.0 and s["size_ratio"] <= 1.05
        elif wid in ("l", "m"):
            f = med.get("filter")
            s["filter_plugin"] = f / p if f and p else None
            target = "filter/plugin>=0.8"
            if s["filter_plugin"] is not None:
                verdict = s["filter_plugin"] >= 0.8
        elif wid == "i":
            lim = (c.l2_budget + c.slack) / MiB
            target = "p<=%.0f MiB (L2 %s+%s)" % (
                lim, fmt_size(c.l2_budget), fmt_size(c.slack))
            if p:
                verdict = p <= lim
        s["target"] = target
        s["verdict"] = ("PASS" if verdict else "MISS") if target else "-"
        if target and verdict is None:
            s["verdict"] = "MISS (n/a)"
        summary[wid] = s
    return summary


def fnum(v, unit=""):
    if v is None:
        return "n/a"
    if unit == "s":
        return "%.2f" % v
    if v >= 1000:
        return "%.0f" % v
    return "%.1f" % v


def fratio(v):
    return "n/a" if v is None else "%.2f" % v


def bar(v, width=40, top=2.5):
    if v is None:
        return "n/a".ljust(width + 2)
    one = int(round(width / top))
    n = min(width, int(round(v / top * width)))
    cells = ["#" if i < n else " " for i in range(width)]
    if cells[one] == " ":
        cells[one] = "|"
    else:
        cells[one] = "+"
    return "[" + "".join(cells) + ("]" if v <= top else ">")


def render(bench, summary, header):
    lines = list(header)
    lines.append("")
    lines.append("%-2s %-44s %-6s %9s %9s %9s %6s %6s  %-28s %s" % (
        "", "workload", "unit", "plugin", "qemu-nbd", "raw", "p/q",
        "p/raw", "target", "verdict"))
    lines.append("-" * 140)
    for wid in sorted(summary):
        s = summary[wid]
        m = s["median"]
        lines.append("%-2s %-44s %-6s %9s %9s %9s %6s %6s  %-28s %s" % (
            wid, s["name"][:44], s["unit"], fnum(m.get("plugin"), s["unit"]),
            fnum(m.get("qemu"), s["unit"]), fnum(m.get("raw"), s["unit"]),
            fratio(s["plugin_qemu"]), fratio(s["plugin_raw"]), s["target"],
            s["verdict"]))
    lines.append("")
    lines.append("Medians of %d repetitions.  IOPS and MiB/s: higher is "
                 "better; s (h) and MiB (i): lower is better." %
                 bench.cfg.reps)
    for wid in ("l", "m"):
        if wid in summary:
            s = summary[wid]
            lines.append("%s: the filter (--filter=qcow2 file) %s %s, the "
                         "plugin %s %s: filter/plugin %s." % (
                             wid, fnum(s["median"].get("filter")), s["unit"],
                             fnum(s["median"].get("plugin")), s["unit"],
                             fratio(s.get("filter_plugin"))))
    if "h" in summary:
        lines.append("h: plugin/qemu-nbd/raw columns are nbdcopy from that "
                     "server; qemu-img convert median %s s." %
                     fnum(summary["h"]["median"].get("qemu-img"), "s"))
    if "cv" in summary:
        su = summary["cv"].get("setup", {})
        lines.append("cv: setup (creation and server start, median) plugin "
                     "create=true %s s, qemu-img create + qemu-nbd %s s." %
                     tuple(fnum(su.get(k), "s") for k in ("plugin", "qemu")))
    if "cz" in summary:
        sz = summary["cz"].get("sizes", {})
        lines.append("cz: output file size (median) plugin %s, qemu-nbd "
                     "(compress driver) %s, raw (allocated) %s; size p/q "
                     "%s." % tuple(
                         ["%.1f MiB" % (sz[k] / MiB) if sz.get(k) else "n/a"
                          for k in ("plugin", "qemu", "raw")] +
                         [fratio(summary["cz"].get("size_ratio"))]))
    lines.append("")
    lines.append("Ratio plot (| or + marks 1.0, full width = 2.5x; for h "
                 "and i lower is better):")
    for wid in sorted(summary):
        s = summary[wid]
        for key, lab in (("plugin_qemu", "p/qemu-nbd"),
                         ("plugin_raw", "p/raw")):
            lines.append("  %s %-10s %5s %s" % (
                wid, lab, fratio(s[key]), bar(s[key])))
    lines.append("")
    lines.append("Per-repetition values (run order rotates each "
                 "repetition):")
    for wid in sorted(bench.results):
        res = bench.results[wid]
        for kind, runs in res["runs"].items():
            vals = ", ".join(fnum(r["value"], res["unit"]) for r in runs)
            errs = [r["error"] for r in runs if r["error"]]
            extra = ""
            if wid == "i":
                extra = "  (IOPS %s)" % ", ".join(
                    "%.0f" % r["iops"] for r in runs if r.get("iops"))
            lines.append("  %s %-9s %s%s" % (wid, Bench.LABEL.get(kind, kind),
                                             vals, extra))
            if errs:
                lines.append("      error: %s" % errs[0][:300])
    if bench.notes:
        lines.append("")
        lines.append("Notes:")
        lines += ["  " + n for n in bench.notes]
    return lines


def machine_info(cfg):
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    load = open("/proc/loadavg").read().split()[:3]
    return {"nproc": os.cpu_count(), "cpu": cpu,
            "mem": "%.1f GiB" % (mem / GiB), "kernel": os.uname().release,
            "loadavg_at_start": " ".join(load)}


def versions(cfg):
    desc = subprocess.run(["git", "-C", cfg.srcdir, "describe", "--always",
                           "--dirty", "--tags"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True).stdout.strip()
    branch = subprocess.run(["git", "-C", cfg.srcdir, "rev-parse",
                             "--abbrev-ref", "HEAD"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL,
                            text=True).stdout.strip()
    return {"nbdkit": first_line(["nbdkit", "--version"]),
            "qemu-nbd": first_line(["qemu-nbd", "--version"]),
            "qemu-img": first_line(["qemu-img", "--version"]),
            "fio": first_line(["fio", "--version"]),
            "nbdcopy": first_line(["nbdcopy", "--version"]),
            "repo": "%s (%s)" % (desc or "unknown", branch or "?")}


def main():
    cfg = Config()
    bench = Bench(cfg)

    def on_signal(signum, frame):
        if not bench.cleaning:
            raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    started = datetime.datetime.now(datetime.timezone.utc)
    mach, vers = machine_info(cfg), versions(cfg)
    header = [
        "nbdkit-qcow2 benchmark, %s%s" % (
            started.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "  [QUICK smoke run]" if cfg.quick else ""),
        "plugin:   %s" % bench.plugin_desc,
        "machine:  nproc=%(nproc)s, cpu=%(cpu)s, mem=%(mem)s, "
        "kernel=%(kernel)s, loadavg at start %(loadavg_at_start)s" % mach,
        "versions: %s; %s; %s; %s; nbdcopy %s" % (
            vers["nbdkit"], vers["qemu-nbd"], vers["qemu-img"], vers["fio"],
            vers["nbdcopy"].replace("nbdcopy ", "")),
        "repo:     %s" % vers["repo"],
        "config:   " + " ".join("%s=%s" % kv for kv in cfg.as_dict().items()),
        "seed:     %d (python random.Random: image data, qemu-io offsets; "
        "fio --randseed)" % cfg.seed,
        "images:   in %s; qemu-nbd -f qcow2 --cache=writeback --aio=threads "
        "--shared=16 --persistent; nbdkit -U SOCK PLUGIN file=IMG; "
        "nbdkit -U SOCK file RAW; fio ioengine=nbd iodepth=%d" %
        (os.path.dirname(bench.wd), cfg.iodepth),
    ]
    for h in header:
        log(h)
    try:
        need = set(cfg.workloads)
        bench.make_images(need)
        for wl in FIO_WORKLOADS:
            if wl["id"] in need:
                bench.fio_workload(wl)
        if "h" in need:
            bench.copy_workload()
        if "i" in need:
            bench.mem_workload()
        if "cz" in need:
            bench.compress_copy_workload()
        if "cv" in need:
            bench.create_pipeline_workload()
    finally:
        bench.cleanup()

    elapsed = (datetime.datetime.now(datetime.timezone.utc) - started)
    header.append("duration: %.0f s" % elapsed.total_seconds())
    summary = summarize(bench)
    lines = render(bench, summary, header)
    blob = {"header": header, "config": cfg.as_dict(), "machine": mach,
            "versions": vers, "plugin": bench.plugin_desc,
            "summary": summary, "results": bench.results}
    lines += ["", "--- BEGIN JSON ---", json.dumps(blob, indent=1,
                                                   sort_keys=True),
              "--- END JSON ---"]
    text = "\n".join(lines) + "\n"

    os.makedirs(cfg.results, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    suffix = ("-quick" if cfg.quick else "") + \
        ("-standin" if cfg.standin else "")
    out = os.path.join(cfg.results, "%s%s.txt" % (stamp, suffix))
    with open(out, "w") as f:
        f.write(text)
    latest = os.path.join(cfg.results, "latest-quick.txt" if cfg.quick
                          else "latest.txt")
    shutil.copyfile(out, latest)
    # The report without the JSON blob.
    print("\n".join(lines[:lines.index("--- BEGIN JSON ---") - 1]))
    print("\nsaved: %s (and %s)" % (out, latest))


if __name__ == "__main__":
    main()
