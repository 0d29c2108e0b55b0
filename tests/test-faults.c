/* nbdkit-qcow2 tests: injected I/O errors in the write path.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * A q2_io wrapped around a real file counts pwrite and flush calls and
 * fails the Nth one with EIO (nothing written) or ENOSPC (a sector-
 * aligned prefix written first, as a full disk does), either once or
 * for good ("sticky": the disk stays broken).  A seeded workload runs
 * once without faults to count the calls, then once for every N (or a
 * deterministic sample, always with the first 30), each on a fresh copy
 * of a starting image that qemu-img made from a known raw file.  Every
 * run checks that
 *  (a) the request in which the fault fired fails with the injected
 *      errno, and nothing crashes;
 *  (b) later requests succeed or fail cleanly with EIO, ENOSPC or
 *      EROFS, and every read that succeeds returns what the model says
 *      (the whole disk is read once more before q2_close);
 *  (c) after q2_close, qemu-img check finds no errors (leaks allowed);
 *  (d) the file reads back (through the layer and through qemu-img
 *      convert) as the model says: all of it if the last flush
 *      succeeded, else everything not changed since the last
 *      successful flush.
 * The model of the guest disk is kept independently of the layer.
 * Lazy-refcounts images left dirty are repaired with qemu-img check -r
 * all before (c).  A separate check ("flush-error") fails fdatasync
 * itself, below the file q2_io: every later flush must fail too.  A kind with an internal snapshot also checks that
 * the snapshot still reads as the starting data.
 *
 * What it shows (see the per-kind summary lines): after a one-shot
 * fault every later request succeeds, the last flush included; after a
 * sticky fault the later requests that fail do so with the injected
 * errno and nothing else; no fault has made the layer set the corrupt
 * bit, so EROFS has not been seen.
 *
 * usage: test-faults [KIND...]
 * environment: SEED; FAULTS_MAX_N (most N values per kind, 80),
 * FAULTS_OPS (workload length, 60), FAULTS_QEMU_READ_EVERY (read back
 * through qemu when N is a multiple, 4), FAULTS_TIMEOUT (seconds, 900),
 * FAULTS_READS (set: preads made by the workload's requests are counted
 * and failed too), VERBOSE, KEEP
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "qcow2-internal.h"
#include "faultlib.h"

struct kind {
  const char *name;
  const char *create_opts;
  uint64_t cluster, size;
  bool compress;                /* the starting data is compressed */
  uint64_t l2_cache;            /* 0: default */
  bool lazy;                    /* lazy refcounts */
  uint64_t slack;               /* see fl_make_image_near_full */
  bool snapshot;                /* the start is also snapshot "s1" */
  bool compress_writes;         /* written with compress=true (run only
                                   when named: test-compress-faults) */
  bool layer_snapshot;          /* made by snapshot-create, not qemu-img */
};

#define K(n, o, cl, sz) .name = n, .create_opts = o, .cluster = cl, .size = sz
static const struct kind kinds[] = {
  { K ("v3", "compat=1.1", 64 * KiB, 8 * MiB) },
  { K ("v2", "compat=0.10", 64 * KiB, 8 * MiB) },
  { K ("rc1-4k", "cluster_size=4096,refcount_bits=1", 4 * KiB, 4 * MiB) },
  { K ("extl2", "extended_l2=on", 64 * KiB, 8 * MiB) },
  { K ("lazy", "lazy_refcounts=on", 64 * KiB, 8 * MiB), .lazy = true },
  /* Small clusters and a tiny L2 cache: new refcount blocks, and L2
   * write-back on eviction.
   */
  { K ("c512", "cluster_size=512", 512, 2 * MiB), .l2_cache = 8 * KiB },
  /* A file a little short of what its refcount table covers: the
   * table grows, and blocks are then added to the new one.
   */
  { K ("c512-rc64", "cluster_size=512,refcount_bits=64", 512, 4 * MiB),
    .l2_cache = 8 * KiB, .slack = 24 * KiB },
  { K ("compressed", "compat=1.1", 64 * KiB, 8 * MiB), .compress = true },
  /* Clusters and L2 tables shared with an internal snapshot, whose
   * content must never change.
   */
  { K ("snapshot", "compat=1.1,cluster_size=4096", 4 * KiB, 4 * MiB),
    .snapshot = true },
  /* compress=true: packed pieces placed, written, linked, released. */
  { K ("cw-64k", "compat=1.1", 64 * KiB, 8 * MiB), .compress_writes = true },
  { K ("cw-compressed-4k", "compat=1.1,cluster_size=4096", 4 * KiB, 4 * MiB),
    .compress = true, .compress_writes = true },
  /* The same with the snapshot taken by the layer (snapshot-create). */
  { K ("layer-snapshot", "compat=1.1,cluster_size=4096", 4 * KiB, 4 * MiB),
    .snapshot = true, .layer_snapshot = true },
};

/* ---- the fault-injecting q2_io ---- */

static size_t nops = 60;
static bool fault_reads;        /* count and fail preads too */

static struct {
  long calls, fail_at;          /* fail_at 0: never */
  int err;
  bool sticky;
  long fired;
  int fired_op;                 /* op index of the first fault */
  int cur_op;                   /* -1 open, nops: close */
} fs;

struct fault_io {
  struct q2_io io;
  struct q2_io *inner;
};

static bool
inject (void)
{
  fs.calls++;
  if (fs.fail_at == 0 ||
      !(fs.calls == fs.fail_at || (fs.sticky && fs.calls > fs.fail_at)))
    return false;
  if (fs.fired++ == 0)
    fs.fired_op = fs.cur_op;
  return true;
}

static int
fio_pread (struct q2_io *io, void *buf, size_t n, uint64_t off)
{
  struct q2_io *in = ((struct fault_io *) io)->inner;

  /* Optionally reads fail too, but only inside the workload. */
  if (fault_reads && fs.cur_op >= 0 && (size_t) fs.cur_op < nops &&
      inject ()) {
    errno = fs.err;
    return -1;
  }
  return in->ops->pread (in, buf, n, off);
}

static int
fio_pwrite (struct q2_io *io, const void *buf, size_t n, uint64_t off)
{
  struct q2_io *in = ((struct fault_io *) io)->inner;

  if (inject ()) {
    /* A full disk may take part of the write first. */
    size_t part = (n / 2) & ~(size_t) 511;

    if (fs.err == ENOSPC && part)
      in->ops->pwrite (in, buf, part, off);
    errno = fs.err;
    return -1;
  }
  return in->ops->pwrite (in, buf, n, off);
}

static int
fio_flush (struct q2_io *io)
{
  if (inject ()) {
    errno = fs.err;
    return -1;
  }
  /* No power is lost here, so the file need not reach stable storage:
   * skipping fdatasync keeps the many runs fast.
   */
  return 0;
}

static int64_t
fio_size (struct q2_io *io)
{
  struct q2_io *in = ((struct fault_io *) io)->inner;

  return in->ops->size (in);
}

static void
fio_close (struct q2_io *io)
{
  q2_io_close (((struct fault_io *) io)->inner);
}

static const struct q2_io_ops fault_ops = {
  .pread = fio_pread,
  .pwrite = fio_pwrite,
  .flush = fio_flush,
  .size = fio_size,
  .close = fio_close,
};

static struct q2_io *
fault_io_new (const char *path)
{
  struct fault_io *f = calloc (1, sizeof *f);

  if (f == NULL)
    abort ();
  f->inner = q2_io_file_open (path, false);
  if (f->inner == NULL) {
    free (f);
    return NULL;
  }
  f->io.ops = &fault_ops;
  f->io.name = strdup (path);
  f->io.dev = f->inner->dev;
  f->io.ino = f->inner->ino;
  return &f->io;
}

/* ---- logging ---- */

static bool verbose;
static long n_errors_logged;

static void
log_error (const char *msg)
{
  n_errors_logged++;
  if (verbose)
    fprintf (stderr, "    layer: %s\n", msg);
}

/* ---- one kind ---- */

static char tmpdir[256];
static uint64_t seed;
static long max_n = 80;
static long qemu_read_every = 4;

struct stats {
  bool reftable_moved;
  long runs, fired_in_close, later_ok, later_fail, final_flush_failed;
  long once_later_fail;         /* failures after a one-shot fault */
  long corrupt, dirty, check0, check3, qemu_reads;
  long by_errno[3];             /* later failures: EIO, ENOSPC, EROFS */
};

struct ctx {
  const struct kind *k;
  struct fl_workload w;
  uint8_t *initial;             /* guest content of the starting image */
  uint8_t *tmpl;                /* the starting image file */
  size_t tmpl_len;
  char tmpl_path[300], work[300], raw[300], log[300];
  struct stats st;
  struct fl_model m;
  uint8_t *buf, *data;          /* size bytes; a request's data */
};

#define FAIL(c, n, ...) \
  do { \
    fprintf (stderr, "FAIL [%s N=%ld %s%s seed=%" PRIu64 "]: ", \
             (c)->k->name, (long) (n), fs.err == EIO ? "EIO" : "ENOSPC", \
             fs.sticky ? " sticky" : "", seed); \
    fprintf (stderr, __VA_ARGS__); \
    fprintf (stderr, "\n"); \
    goto fail; \
  } while (0)

static uint64_t
header_u64 (const char *path, unsigned field)
{
  uint8_t d[8];
  uint64_t v = 0;
  int fd = open (path, O_RDONLY | O_CLOEXEC);

  if (fd >= 0 && pread (fd, d, sizeof d, field) == sizeof d)
    v = get_be64 (d);
  if (fd >= 0)
    close (fd);
  return v;
}

static uint64_t
header_incompat (const char *path)
{
  uint8_t d[4];
  int fd = open (path, O_RDONLY | O_CLOEXEC);
  bool v3 = fd >= 0 && pread (fd, d, 4, QH_VERSION) == 4 && get_be32 (d) >= 3;

  if (fd >= 0)
    close (fd);
  return v3 ? header_u64 (path, QH_INCOMPAT) : 0;
}

/* Read the whole guest disk through the layer, from the closed file. */
static int
layer_read_file (const char *path, uint8_t *buf, uint64_t size)
{
  struct q2_open_opts o = { .readonly = true };
  struct q2_io *io = q2_io_file_open (path, true);
  struct q2_image *img;
  int r;

  if (io == NULL)
    return -1;
  if (q2_open_io (io, &o, &img) == -1) {
    q2_io_close (io);
    return -1;
  }
  r = q2_read (img, buf, size, 0);
  q2_close (img);
  return r;
}

/* The data of a write: random, or for compress=true kinds random
 * bytes at the start of every 64 with zeros between (so that clusters
 * compress about 4:1 and several pack into one host cluster).
 */
static void
fill (const struct kind *k, uint8_t *d, uint64_t len, uint64_t op_seed)
{
  uint64_t i;

  fl_fill (d, len, op_seed);
  if (k->compress_writes)
    for (i = 0; i < len; i++)
      if ((i & 63) >= 16)
        d[i] = 0;
}

/* Run the workload with a fault at call fail_at (0: none).  Returns 0
 * if every check passed; *calls gets the number of calls made.
 */
static int
run_once (struct ctx *c, long fail_at, int err, bool sticky, long *calls)
{
  const struct kind *k = c->k;
  struct q2_open_opts opts = { .l2_cache_bytes = k->l2_cache,
                               .compress = k->compress_writes };
  struct fl_model *mp = &c->m;
  struct q2_image *img = NULL;
  struct q2_io *io;
  uint8_t *buf = c->buf, *data = c->data;
  bool reported = false, final_ok = false;
  uint64_t compared = 0, inc;
  size_t i;
  int rc;

  fl_model_reset (mp, c->initial);
  memset (&fs, 0, sizeof fs);
  fs.fail_at = fail_at;
  fs.err = err;
  fs.sticky = sticky;
  fs.cur_op = -1;
  n_errors_logged = 0;
  c->st.runs++;

  if (fl_write_file (c->work, c->tmpl, c->tmpl_len) == -1)
    FAIL (c, fail_at, "cannot copy the starting image");
  io = fault_io_new (c->work);
  if (io == NULL)
    FAIL (c, fail_at, "cannot open %s", c->work);
  if (q2_open_io (io, &opts, &img) == -1) {
    q2_io_close (io);
    FAIL (c, fail_at, "q2_open_io failed: %m");
  }

  for (i = 0; i < c->w.n; i++) {
    const struct fl_op *op = &c->w.ops[i];
    int r = 0, e;

    fs.cur_op = i;
    errno = 0;
    switch (op->kind) {
    case FL_WRITE:
      fill (k, data, op->len, op->seed);
      r = q2_write (img, data, op->len, op->off);
      break;
    case FL_ZERO:
      r = q2_zero (img, op->len, op->off, 0);
      break;
    case FL_ZERO_TRIM:
      r = q2_zero (img, op->len, op->off, Q2_ZERO_MAY_TRIM);
      break;
    case FL_TRIM:
      r = q2_trim (img, op->len, op->off);
      break;
    case FL_FLUSH:
      r = q2_flush (img);
      break;
    case FL_READ:
      r = q2_read (img, buf, op->len, op->off);
      break;
    }
    e = errno;
    if (fs.fired && fs.fired_op == (int) i && !reported) {
      reported = true;
      if (r != -1)
        FAIL (c, fail_at, "op %zu (%s %" PRIu64 "+%" PRIu64 ") succeeded "
              "although the injected fault fired in it", i,
              fl_kind_name (op->kind), op->off, op->len);
      if (e != err)
        FAIL (c, fail_at, "op %zu (%s) failed with errno %d (%s), not the "
              "injected %s", i, fl_kind_name (op->kind), e, strerror (e),
              strerror (err));
    }
    else if (r == -1) {
      if (!fs.fired)
        FAIL (c, fail_at, "op %zu (%s %" PRIu64 "+%" PRIu64 ") failed with "
              "no fault injected: %s", i, fl_kind_name (op->kind), op->off,
              op->len, strerror (e));
      if (e == EIO) c->st.by_errno[0]++;
      else if (e == ENOSPC) c->st.by_errno[1]++;
      else if (e == EROFS) c->st.by_errno[2]++;
      else
        FAIL (c, fail_at, "op %zu (%s) failed after the fault with an "
              "unexpected errno %d (%s)", i, fl_kind_name (op->kind), e,
              strerror (e));
      c->st.later_fail++;
      if (!fs.sticky) {
        c->st.once_later_fail++;
        if (verbose)
          fprintf (stderr, "N=%ld: op %zu (%s) failed after a one-shot "
                   "fault in op %d: %s\n", fail_at, i,
                   fl_kind_name (op->kind), fs.fired_op, strerror (e));
      }
    }
    else if (fs.fired)
      c->st.later_ok++;

    if (op->kind == FL_READ && r == 0) {
      char what[64];

      snprintf (what, sizeof what, "read op %zu", i);
      if (fl_model_check (mp, buf, op->off, op->len, false, NULL, what))
        FAIL (c, fail_at, "a read returned wrong data");
    }
    if (op->kind == FL_WRITE)
      fl_model_apply (mp, op, data, r == 0);
    else
      fl_model_apply (mp, op, NULL, r == 0);
    if (op->kind == FL_FLUSH && r == 0)
      fl_model_flushed (mp);
    if (i == c->w.n - 1)
      final_ok = r == 0;
  }
  if (!final_ok)
    c->st.final_flush_failed++;

  /* What the open image shows must already match the model. */
  fs.cur_op = c->w.n;
  if (q2_read (img, buf, k->size, 0) == 0) {
    if (fl_model_check (mp, buf, 0, k->size, false, NULL, "before close"))
      FAIL (c, fail_at, "the open image reads back wrong");
  }
  else if (!fs.fired)
    FAIL (c, fail_at, "reading the whole disk failed: %m");
  q2_close (img);
  img = NULL;
  *calls = fs.calls;

  if (fail_at) {
    if (!fs.fired)
      FAIL (c, fail_at, "the fault never fired (%ld calls)", fs.calls);
    if (fs.fired_op == (int) c->w.n)
      c->st.fired_in_close++;
  }
  else if (n_errors_logged)
    FAIL (c, fail_at, "the layer reported %ld errors with no fault",
          n_errors_logged);

  /* (c) qemu-img check.  A lazy-refcounts image left dirty (its
   * header could not be rewritten at close) legitimately has refcounts
   * that are too low: QEMU rebuilds them before using the image, so
   * here it is repaired first, and must then be clean.
   */
  inc = header_incompat (c->work);
  if (inc & QCOW2_INCOMPAT_CORRUPT)
    c->st.corrupt++;
  if (inc & QCOW2_INCOMPAT_DIRTY) {
    char *rargv[] = { "qemu-img", "check", "-q", "-r", "all", "-f", "qcow2",
                      c->work, NULL };

    c->st.dirty++;
    if (!fs.fired)
      FAIL (c, fail_at, "the dirty bit is still set after a clean close");
    if (!k->lazy)
      FAIL (c, fail_at, "the dirty bit is set on an image without lazy "
            "refcounts");
    rc = fl_run (rargv, c->log);
    if (rc != 0 && rc != 3) {
      fl_print_file (c->log, 40);
      FAIL (c, fail_at, "qemu-img check -r all of the dirty image exited "
            "with %d", rc);
    }
  }
  rc = fl_qemu_check (c->work, c->log);
  if (rc == 0)
    c->st.check0++;
  else if (rc == 3 && fail_at)
    c->st.check3++;
  else {
    fl_print_file (c->log, 40);
    FAIL (c, fail_at, "qemu-img check exited with %d", rc);
  }

  /* (d) the data, through the layer and through qemu. */
  memset (buf, 0xa5, k->size);
  if (layer_read_file (c->work, buf, k->size) == -1)
    FAIL (c, fail_at, "cannot read the closed image back: %m");
  if (fl_model_check (mp, buf, 0, k->size, !final_ok, &compared,
                      "after close (layer)"))
    FAIL (c, fail_at, "the closed image reads back wrong through the layer");
  if (fail_at == 0 || qemu_read_every <= 1 ||
      fail_at % qemu_read_every == 0) {
    c->st.qemu_reads++;
    memset (buf, 0x5a, k->size);
    if (fl_qemu_read_all (c->work, NULL, c->raw, buf, k->size) == -1)
      FAIL (c, fail_at, "qemu-img convert of the closed image failed");
    if (fl_model_check (mp, buf, 0, k->size, !final_ok, NULL,
                        "after close (qemu)"))
      FAIL (c, fail_at, "the closed image reads back wrong through qemu");
  }

  if (fail_at == 0) {
    /* Did the workload move the refcount table? */
    c->st.reftable_moved = get_be64 (c->tmpl + QH_REFTABLE_OFFSET) !=
                           header_u64 (c->work, QH_REFTABLE_OFFSET);
    /* Self-tests: the comparison sees real data, and a changed byte. */
    uint64_t b = fl_model_known_byte (mp, seed);

    if (compared < k->size / 2 || b == UINT64_MAX)
      FAIL (c, fail_at, "the model compared only %" PRIu64 " bytes",
            compared);
    buf[b] ^= 0x40;
    fprintf (stderr, "self-test: a deliberately changed byte must be "
             "reported:\n");
    if (fl_model_check (mp, buf, 0, k->size, false, NULL, "self-test") != 1)
      FAIL (c, fail_at, "the model did not notice a changed byte");
  }
  if (k->snapshot && (fail_at == 0 || qemu_read_every <= 1 ||
                      fail_at % qemu_read_every == 0) &&
      (fl_qemu_read_all (c->work, "s1", c->raw, buf, k->size) == -1 ||
       memcmp (buf, c->initial, k->size) != 0))
    FAIL (c, fail_at, "the snapshot's content changed");

  return 0;

 fail:
  if (img)
    q2_close (img);
  return -1;
}

static int
make_start (struct ctx *c)
{
  const struct kind *k = c->k;

  snprintf (c->tmpl_path, sizeof c->tmpl_path, "%s/%s.qcow2", tmpdir, k->name);
  snprintf (c->work, sizeof c->work, "%s/%s-work.qcow2", tmpdir, k->name);
  snprintf (c->raw, sizeof c->raw, "%s/%s-out.raw", tmpdir, k->name);
  snprintf (c->log, sizeof c->log, "%s/%s-check.log", tmpdir, k->name);
  c->initial = malloc (k->size);
  if (c->initial == NULL)
    abort ();
  if (k->slack)
    return fl_make_image_near_full (c->tmpl_path, k->create_opts, k->size,
                                    k->slack, seed, c->initial, &c->tmpl,
                                    &c->tmpl_len);
  if (fl_make_image (c->tmpl_path, k->create_opts, k->compress, k->size,
                     0, seed, c->initial, &c->tmpl, &c->tmpl_len) == -1)
    return -1;
  if (k->snapshot && k->layer_snapshot)
    return fl_layer_snapshot_create (c->tmpl_path, "s1", &c->tmpl,
                                     &c->tmpl_len);
  if (k->snapshot)
    return fl_snapshot_create (c->tmpl_path, "s1", &c->tmpl, &c->tmpl_len);
  return 0;
}

static int
test_kind (const struct kind *k)
{
  struct ctx c = { .k = k };
  long total, calls, *ns, nn = 0, j;
  time_t t0 = time (NULL);
  int ret = 0;

  if (make_start (&c) == -1)
    return -1;
  fl_workload_gen (&c.w, seed, k->size, k->cluster, nops);
  fl_model_init (&c.m, k->size, c.initial);
  c.buf = malloc (k->size);
  c.data = malloc (MiB);
  if (c.buf == NULL || c.data == NULL)
    abort ();

  /* The fault-free run counts the calls. */
  if (run_once (&c, 0, EIO, false, &total) == -1)
    return -1;
  if (total < 10) {
    fprintf (stderr, "FAIL [%s]: only %ld pwrite/flush calls\n", k->name,
             total);
    return -1;
  }

  ns = malloc ((total + 1) * sizeof *ns);
  if (ns == NULL)
    abort ();
  if (total <= max_n) {
    for (j = 1; j <= total; j++)
      ns[nn++] = j;
  }
  else {
    long spread = max_n - 30;

    for (j = 1; j <= 30; j++)
      ns[nn++] = j;
    for (j = 1; j <= spread; j++) {
      long n = 30 + (long) ((double) j * (total - 30) / spread);

      if (n > ns[nn - 1])
        ns[nn++] = n;
    }
  }

  /* Both errnos, and a fault that stays, over neighbouring N. */
  for (j = 0; j < nn && ret == 0; j++) {
    long n = ns[j];
    int err = n % 2 ? EIO : ENOSPC;
    bool sticky = n % 4 == 0 || n % 4 == 3;

    if (run_once (&c, n, err, sticky, &calls) == -1)
      ret = -1;
  }
  printf ("%-10s %4ld calls, %3ld runs (%s), %lds: later requests %ld ok, "
          "%ld failed (EIO %ld, ENOSPC %ld, EROFS %ld; %ld after a one-shot "
          "fault); last flush failed "
          "%ld; corrupt bit %ld, dirty %ld; qemu-img check 0:%ld 3:%ld; "
          "qemu reads %ld; faults in close %ld%s\n",
          k->name, total, c.st.runs - 1,
          nn == total ? "every N" : "sampled", (long) (time (NULL) - t0),
          c.st.later_ok, c.st.later_fail, c.st.by_errno[0],
          c.st.by_errno[1], c.st.by_errno[2], c.st.once_later_fail,
          c.st.final_flush_failed,
          c.st.corrupt, c.st.dirty, c.st.check0, c.st.check3,
          c.st.qemu_reads, c.st.fired_in_close,
          c.st.reftable_moved ? "; the refcount table grew" : "");
  fflush (stdout);
  free (ns);
  fl_workload_free (&c.w);
  fl_model_free (&c.m);
  free (c.buf);
  free (c.data);
  free (c.initial);
  free (c.tmpl);
  return ret;
}

/* ---- a failed fdatasync ----
 * Below the file q2_io: this definition replaces the C library's for
 * the layer linked into this program.  On Linux a failed fdatasync may
 * have dropped the dirty pages it could not write, and the next one
 * succeeds without them, so a later flush must not claim durability.
 */
static int fdatasync_failures;  /* fail this many calls with EIO */

int
fdatasync (int fd)
{
  if (fdatasync_failures > 0) {
    fdatasync_failures--;
    errno = EIO;
    return -1;
  }
  return syscall (SYS_fdatasync, fd);
}

static int
test_flush_error_sticky (void)
{
  const struct kind *k = &kinds[0];
  struct ctx c = { .k = k };
  struct q2_open_opts opts = { 0 };
  struct q2_image *img;
  struct q2_io *io;
  uint8_t data[4096];
  int r1, r2, r3, e1, e2, rc;

  if (make_start (&c) == -1 ||
      fl_write_file (c.work, c.tmpl, c.tmpl_len) == -1)
    return -1;
  io = q2_io_file_open (c.work, false);
  if (io == NULL || q2_open_io (io, &opts, &img) == -1) {
    fprintf (stderr, "FAIL [flush error]: cannot open %s\n", c.work);
    return -1;
  }
  memset (data, 0x42, sizeof data);
  if (q2_write (img, data, sizeof data, 12345) == -1) {
    fprintf (stderr, "FAIL [flush error]: write: %m\n");
    q2_close (img);
    return -1;
  }
  fdatasync_failures = 1;
  r1 = q2_flush (img);
  e1 = errno;
  r2 = q2_flush (img);
  e2 = errno;
  r3 = q2_write (img, data, sizeof data, 2 * MiB + 7);
  fdatasync_failures = 0;
  q2_close (img);
  rc = fl_qemu_check (c.work, c.log);
  free (c.initial);
  free (c.tmpl);
  if (r1 != -1 || e1 != EIO) {
    fprintf (stderr, "FAIL [flush error]: a flush whose fdatasync failed "
             "returned %d (%s)\n", r1, strerror (e1));
    return -1;
  }
  if (r2 != -1 || e2 != EIO) {
    fprintf (stderr, "FAIL [flush error]: the flush after a failed fdatasync "
             "returned %d (%s): writes the kernel may have dropped would "
             "be reported durable\n", r2, r2 ? strerror (e2) : "success");
    return -1;
  }
  if (r3 == -1 || (rc != 0 && rc != 3)) {
    fprintf (stderr, "FAIL [flush error]: afterwards a write returned %d, "
             "qemu-img check %d\n", r3, rc);
    fl_print_file (c.log, 20);
    return -1;
  }
  printf ("flush-error: after a failed fdatasync every later flush fails "
          "with EIO; writes still work\n");
  return 0;
}

int
main (int argc, char *argv[])
{
  const char *s = getenv ("SEED"), *t = getenv ("TMPDIR");
  int i, failed = 0;
  size_t j;

  verbose = getenv ("VERBOSE") != NULL;
  seed = s && *s ? strtoull (s, NULL, 0) : (uint64_t) time (NULL) % 100000;
  if (getenv ("FAULTS_MAX_N"))
    max_n = atol (getenv ("FAULTS_MAX_N"));
  fault_reads = getenv ("FAULTS_READS") != NULL;
  if (getenv ("FAULTS_OPS"))
    nops = atol (getenv ("FAULTS_OPS"));
  if (getenv ("FAULTS_QEMU_READ_EVERY"))
    qemu_read_every = atol (getenv ("FAULTS_QEMU_READ_EVERY"));
  if (max_n < 31)
    max_n = 31;
  if (nops < 2)
    nops = 2;
  /* A hang is a failure too. */
  alarm (getenv ("FAULTS_TIMEOUT") ? atoi (getenv ("FAULTS_TIMEOUT")) : 900);
  printf ("seed=%" PRIu64 " (rerun with SEED=%" PRIu64 ")\n", seed, seed);
  fflush (stdout);
  q2_set_log_hooks (log_error, NULL);

  snprintf (tmpdir, sizeof tmpdir, "%s/test-faults-XXXXXX", t ? t : "/tmp");
  if (mkdtemp (tmpdir) == NULL) {
    perror ("mkdtemp");
    return 1;
  }
  {
    bool want = argc < 2;

    for (i = 1; i < argc; i++)
      if (strcmp (argv[i], "flush-error") == 0)
        want = true;
    if (want && test_flush_error_sticky () == -1)
      failed++;
  }
  for (j = 0; j < sizeof kinds / sizeof kinds[0]; j++) {
    bool want = argc < 2 && !kinds[j].compress_writes;

    for (i = 1; i < argc; i++)
      if (strcmp (argv[i], kinds[j].name) == 0)
        want = true;
    if (want && test_kind (&kinds[j]) == -1)
      failed++;
  }
  if (getenv ("KEEP"))
    printf ("kept %s\n", tmpdir);
  else
    fl_rm_rf (tmpdir);
  if (failed)
    printf ("%d image kinds FAILED (seed=%" PRIu64 ")\n", failed, seed);
  return failed ? 1 : 0;
}
