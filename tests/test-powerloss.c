/* nbdkit-qcow2 tests: power-loss replay.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * A recording q2_io keeps the image in memory and logs every pwrite
 * (offset and data) and every flush.  A seeded workload runs once.
 * Then, for flush points k of the log, the file is rebuilt as a power
 * cut between flush k and flush k+1 could leave it: everything written
 * before flush k, plus a subset of the writes issued after it (none,
 * all, random subsets in which each write is kept or dropped
 * independently, a random prefix), applied in order.  Each rebuilt
 * file must
 *  - pass qemu-img check with no errors (leaks allowed), except with
 *    lazy refcounts, where stale refcounts are expected and QEMU
 *    rebuilds them on open (a sample is repaired with qemu-img check
 *    -r all and must then be clean);
 *  - read back, through the layer and (for a sample) through qemu-img
 *    convert, with every byte that no request changed after the last
 *    guest flush acknowledged before flush k equal to the model.
 * Torn writes are not simulated.
 *
 * usage: test-powerloss [KIND...]
 * environment: SEED; POWERLOSS_CUTS (most cut points per kind, 60),
 * POWERLOSS_VARIANTS (rebuilt files per cut point, 6), POWERLOSS_OPS
 * (workload length, 100), POWERLOSS_QEMU_READ_EVERY (10),
 * POWERLOSS_TIMEOUT (seconds, 900), VERBOSE, KEEP
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "qcow2-internal.h"
#include "faultlib.h"

struct kind {
  const char *name;
  const char *create_opts;
  uint64_t cluster, size;
  bool lazy;                    /* check data only */
  uint64_t l2_cache;            /* 0: default */
  uint64_t slack;               /* see fl_make_image_near_full */
  bool snapshot;                /* the start is also snapshot "s1" */
  bool compress;                /* the starting data is compressed */
  bool compress_writes;         /* written with compress=true (run only
                                   when named: test-compress-powerloss) */
  bool layer_snapshot;          /* made by snapshot-create, not qemu-img */
};

#define K(n, o, cl, sz) .name = n, .create_opts = o, .cluster = cl, .size = sz
static const struct kind kinds[] = {
  { K ("64k", "compat=1.1", 64 * KiB, 8 * MiB) },
  { K ("64k-rc1", "compat=1.1,refcount_bits=1", 64 * KiB, 8 * MiB) },
  { K ("4k", "compat=1.1,cluster_size=4096", 4 * KiB, 4 * MiB) },
  { K ("4k-rc1", "compat=1.1,cluster_size=4096,refcount_bits=1", 4 * KiB,
       4 * MiB) },
  /* New refcount blocks, a refcount table that grows, L2 evictions. */
  { K ("c512-rc64", "compat=1.1,cluster_size=512,refcount_bits=64", 512,
       4 * MiB), .l2_cache = 8 * KiB, .slack = 24 * KiB },
  { K ("lazy", "compat=1.1,lazy_refcounts=on", 64 * KiB, 8 * MiB),
    .lazy = true },
  { K ("extl2", "compat=1.1,extended_l2=on", 64 * KiB, 8 * MiB) },
  /* Compressed clusters are replaced, never rewritten. */
  { K ("compressed", "compat=1.1", 64 * KiB, 8 * MiB), .compress = true },
  /* Shared clusters and L2 tables: the snapshot must never change. */
  { K ("snapshot", "compat=1.1,cluster_size=4096", 4 * KiB, 4 * MiB),
    .snapshot = true },
  /* compress=true: packed compressed clusters, replaced and released. */
  { K ("cw-64k", "compat=1.1", 64 * KiB, 8 * MiB), .compress_writes = true },
  { K ("cw-4k-zstd", "compat=1.1,cluster_size=4096,compression_type=zstd",
       4 * KiB, 4 * MiB), .compress_writes = true },
  { K ("cw-compressed-rc2", "compat=1.1,refcount_bits=2", 64 * KiB, 8 * MiB),
    .compress = true, .compress_writes = true },
  /* The same with the snapshot taken by the layer (snapshot-create). */
  { K ("layer-snapshot", "compat=1.1,cluster_size=4096", 4 * KiB, 4 * MiB),
    .snapshot = true, .layer_snapshot = true },
};

/* ---- the recording q2_io ---- */

struct event {
  bool flush;
  uint64_t off;
  size_t len;
  uint8_t *data;
};

static struct {
  struct event *ev;
  size_t n, cap;
} rec;

struct rec_io {
  struct q2_io io;
  struct q2_io *inner;          /* in memory */
};

static void
record (bool flush, const void *buf, size_t n, uint64_t off)
{
  struct event *e;

  if (rec.n == rec.cap) {
    rec.cap = rec.cap ? 2 * rec.cap : 1024;
    rec.ev = realloc (rec.ev, rec.cap * sizeof *rec.ev);
    if (rec.ev == NULL)
      abort ();
  }
  e = &rec.ev[rec.n++];
  e->flush = flush;
  e->off = off;
  e->len = n;
  e->data = NULL;
  if (!flush) {
    e->data = malloc (n ? n : 1);
    if (e->data == NULL)
      abort ();
    memcpy (e->data, buf, n);
  }
}

static int
rio_pread (struct q2_io *io, void *buf, size_t n, uint64_t off)
{
  struct q2_io *in = ((struct rec_io *) io)->inner;

  return in->ops->pread (in, buf, n, off);
}

static int
rio_pwrite (struct q2_io *io, const void *buf, size_t n, uint64_t off)
{
  struct q2_io *in = ((struct rec_io *) io)->inner;

  if (in->ops->pwrite (in, buf, n, off) == -1)
    return -1;
  record (false, buf, n, off);
  return 0;
}

static int
rio_flush (struct q2_io *io)
{
  record (true, NULL, 0, 0);
  return 0;
}

static int64_t
rio_size (struct q2_io *io)
{
  struct q2_io *in = ((struct rec_io *) io)->inner;

  return in->ops->size (in);
}

static void
rio_close (struct q2_io *io)
{
  q2_io_close (((struct rec_io *) io)->inner);
}

static const struct q2_io_ops rec_ops = {
  .pread = rio_pread,
  .pwrite = rio_pwrite,
  .flush = rio_flush,
  .size = rio_size,
  .close = rio_close,
};

static struct q2_io *
rec_io_new (const uint8_t *data, size_t len)
{
  struct rec_io *r = calloc (1, sizeof *r);

  if (r == NULL)
    abort ();
  r->inner = q2_io_mem_new ("image.qcow2", data, len, false);
  if (r->inner == NULL)
    abort ();
  r->io.ops = &rec_ops;
  r->io.name = strdup ("image.qcow2");
  return &r->io;
}

static void
rec_reset (void)
{
  size_t i;

  for (i = 0; i < rec.n; i++)
    free (rec.ev[i].data);
  rec.n = 0;
}

/* ---- a growable file image ---- */

struct file {
  uint8_t *d;
  size_t len, cap;
};

static void
file_apply (struct file *f, const struct event *e)
{
  size_t end = e->off + e->len;

  if (end > f->cap) {
    f->cap = end * 2;
    f->d = realloc (f->d, f->cap);
    if (f->d == NULL)
      abort ();
  }
  if (end > f->len) {
    if (e->off > f->len)
      memset (f->d + f->len, 0, e->off - f->len);
    f->len = end;
  }
  memcpy (f->d + e->off, e->data, e->len);
}

static void
file_copy (struct file *dst, const struct file *src)
{
  if (dst->cap < src->len) {
    dst->cap = src->cap;
    dst->d = realloc (dst->d, dst->cap);
    if (dst->d == NULL)
      abort ();
  }
  memcpy (dst->d, src->d, src->len);
  dst->len = src->len;
}

/* ---- logging ---- */

static long n_errors_logged;

static void
log_error (const char *msg)
{
  n_errors_logged++;
  if (getenv ("VERBOSE"))
    fprintf (stderr, "    layer: %s\n", msg);
}

/* ---- one kind ---- */

static char tmpdir[256];
static uint64_t seed;
static size_t nops = 100;
static long max_cuts = 60, variants = 6, qemu_read_every = 10;

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

/* Read the whole guest disk of a file image through the layer. */
static int
layer_read (const struct file *f, uint8_t *buf, uint64_t size)
{
  struct q2_open_opts o = { .readonly = true };
  struct q2_io *io = q2_io_mem_new ("rebuilt.qcow2", f->d, f->len, true);
  struct q2_image *img;
  int r;

  if (io == NULL)
    abort ();
  if (q2_open_io (io, &o, &img) == -1) {
    q2_io_close (io);
    return -1;
  }
  r = q2_read (img, buf, size, 0);
  q2_close (img);
  return r;
}

static int
test_kind (const struct kind *k)
{
  struct fl_workload w;
  struct fl_model m;
  struct q2_open_opts opts = { .l2_cache_bytes = k->l2_cache,
                               .compress = k->compress_writes };
  struct q2_image *img;
  uint8_t *initial = malloc (k->size), *buf = malloc (k->size);
  uint8_t *data = malloc (MiB), *tmpl;
  size_t tmpl_len, i, *ack, nflush = 0, *fl, nfl = 0, *flush_op;
  char path[300], log[300], raw[300];
  struct file base = { 0 }, var = { 0 };
  time_t t0 = time (NULL);
  long ncuts = 0, nvariants = 0, ndropped = 0, nchecks = 0, nleaks = 0;
  long nqemu = 0;
  long cut, j, prev_cut = -2;
  size_t model_op = 0, ev_base = 0;
  uint64_t compared = 0, rs;
  int ret = -1;

  if (!initial || !buf || !data)
    abort ();
  snprintf (path, sizeof path, "%s/%s.qcow2", tmpdir, k->name);
  snprintf (log, sizeof log, "%s/%s.log", tmpdir, k->name);
  snprintf (raw, sizeof raw, "%s/%s.raw", tmpdir, k->name);
  if ((k->slack ? fl_make_image_near_full (path, k->create_opts, k->size,
                                           k->slack, seed, initial, &tmpl,
                                           &tmpl_len)
               : fl_make_image (path, k->create_opts, k->compress, k->size,
                                0, seed, initial, &tmpl, &tmpl_len)) == -1)
    return -1;
  if (k->snapshot &&
      (k->layer_snapshot ? fl_layer_snapshot_create (path, "s1", &tmpl,
                                                     &tmpl_len)
                         : fl_snapshot_create (path, "s1", &tmpl,
                                               &tmpl_len)) == -1)
    return -1;
  fl_workload_gen (&w, seed, k->size, k->cluster, nops);
  fl_model_init (&m, k->size, initial);
  ack = calloc (w.n, sizeof *ack);
  flush_op = calloc (w.n, sizeof *flush_op);
  if (!ack || !flush_op)
    abort ();

  /* The recorded run: every request must succeed. */
  rec_reset ();
  n_errors_logged = 0;
  if (q2_open_io (rec_io_new (tmpl, tmpl_len), &opts, &img) == -1) {
    fprintf (stderr, "FAIL [%s]: q2_open_io: %m\n", k->name);
    return -1;
  }
  for (i = 0; i < w.n; i++) {
    const struct fl_op *op = &w.ops[i];
    int r = 0;

    switch (op->kind) {
    case FL_WRITE:
      fill (k, data, op->len, op->seed);
      r = q2_write (img, data, op->len, op->off);
      break;
    case FL_ZERO: r = q2_zero (img, op->len, op->off, 0); break;
    case FL_ZERO_TRIM:
      r = q2_zero (img, op->len, op->off, Q2_ZERO_MAY_TRIM);
      break;
    case FL_TRIM: r = q2_trim (img, op->len, op->off); break;
    case FL_FLUSH: r = q2_flush (img); break;
    case FL_READ: r = q2_read (img, buf, op->len, op->off); break;
    }
    if (r == -1) {
      fprintf (stderr, "FAIL [%s seed=%" PRIu64 "]: op %zu (%s) failed: %m\n",
               k->name, seed, i, fl_kind_name (op->kind));
      q2_close (img);
      return -1;
    }
    if (op->kind == FL_FLUSH) {
      flush_op[nflush] = i;
      ack[nflush++] = rec.n;      /* acknowledged after these events */
    }
  }
  q2_close (img);
  if (n_errors_logged) {
    fprintf (stderr, "FAIL [%s]: the layer reported errors\n", k->name);
    return -1;
  }

  fl = malloc ((rec.n + 1) * sizeof *fl);
  if (fl == NULL)
    abort ();
  for (i = 0; i < rec.n; i++)
    if (rec.ev[i].flush)
      fl[nfl++] = i;
  if (nfl < 3) {
    fprintf (stderr, "FAIL [%s]: only %zu flushes recorded\n", k->name, nfl);
    return -1;
  }

  base.d = malloc (tmpl_len);
  base.len = base.cap = tmpl_len;
  memcpy (base.d, tmpl, tmpl_len);
  rs = seed ^ 0xc0ffee;

  /* Cut points: "before the first flush" (-1), then flush indices,
   * every one or an even sample, always with the last.
   */
  for (j = 0; j <= max_cuts; j++) {
    long total = nfl + 1, lo, hi;
    size_t cand_lo, cand_hi, g, v, nv;
    size_t jg;                    /* the guest flush that is durable */

    if (total <= max_cuts + 1)
      cut = j - 1;
    else
      cut = (long) ((double) j * (total - 1) / max_cuts) - 1;
    if (cut >= (long) nfl || cut <= prev_cut)
      continue;
    prev_cut = cut;
    ncuts++;

    /* Advance the base: every write before flush cut is durable. */
    lo = cut < 0 ? 0 : (long) fl[cut];
    for (; ev_base < (size_t) lo; ev_base++)
      if (!rec.ev[ev_base].flush)
        file_apply (&base, &rec.ev[ev_base]);
    cand_lo = cut < 0 ? 0 : fl[cut] + 1;
    hi = cut + 1 < (long) nfl ? (long) fl[cut + 1] : (long) rec.n;
    cand_hi = hi;

    /* The model: every op up to the last guest flush whose events all
     * happened by flush cut; bytes changed by ops after it, up to the
     * next guest flush, are not checked.
     */
    jg = SIZE_MAX;
    for (g = 0; g < nflush; g++)
      if (ack[g] <= (cut < 0 ? 0 : fl[cut] + 1))
        jg = g;
    {
      size_t upto = jg == SIZE_MAX ? 0 : flush_op[jg] + 1;
      size_t next = jg == SIZE_MAX ? (nflush ? flush_op[0] : w.n)
                  : jg + 1 < nflush ? flush_op[jg + 1] : w.n;

      for (; model_op < upto; model_op++) {
        const struct fl_op *op = &w.ops[model_op];

        if (op->kind == FL_WRITE)
          fill (k, data, op->len, op->seed);
        fl_model_apply (&m, op, data, true);
      }
      fl_model_flushed (&m);
      for (i = upto; i < next; i++)
        if (w.ops[i].kind != FL_FLUSH && w.ops[i].kind != FL_READ)
          fl_model_touch (&m, w.ops[i].off, w.ops[i].len);
    }

    nv = cand_hi > cand_lo ? (size_t) variants : 1;
    for (v = 0; v < nv; v++) {
      /* v 0: none kept; 1: all; 2: a prefix; others: random subsets. */
      size_t prefix = cand_lo + fl_below (&rs, cand_hi - cand_lo + 1);
      char what[128];
      bool dropped = false;
      int rc;

      file_copy (&var, &base);
      for (i = cand_lo; i < cand_hi; i++) {
        bool keep = v == 1 ? true : v == 0 ? false : v == 2 ? i < prefix
                  : fl_below (&rs, 2);

        if (keep)
          file_apply (&var, &rec.ev[i]);
        else
          dropped = true;
      }
      nvariants++;
      ndropped += dropped;
      snprintf (what, sizeof what, "%s cut after flush %ld of %zu, variant "
                "%zu", k->name, cut, nfl, v);

      if (!k->lazy) {
        if (fl_write_file (path, var.d, var.len) == -1)
          goto out;
        rc = fl_qemu_check (path, log);
        nchecks++;
        if (rc == 3)
          nleaks++;
        else if (rc != 0) {
          fl_print_file (log, 40);
          fprintf (stderr, "FAIL [%s seed=%" PRIu64 "]: qemu-img check "
                   "exited with %d\n", what, seed, rc);
          goto out;
        }
      }
      else if (nvariants % 5 == 1) {
        /* Stale refcounts are expected; once QEMU has rebuilt them,
         * nothing else may be wrong.
         */
        char *rargv[] = { "qemu-img", "check", "-q", "-r", "all", "-f",
                          "qcow2", path, NULL };

        if (fl_write_file (path, var.d, var.len) == -1)
          goto out;
        rc = fl_run (rargv, log);
        if (rc == 0 || rc == 3)
          rc = fl_qemu_check (path, log);
        nchecks++;
        if (rc != 0 && rc != 3) {
          fl_print_file (log, 40);
          fprintf (stderr, "FAIL [%s seed=%" PRIu64 "]: after qemu-img "
                   "check -r all, qemu-img check exited with %d\n", what,
                   seed, rc);
          goto out;
        }
      }
      memset (buf, 0xa5, k->size);
      if (layer_read (&var, buf, k->size) == -1) {
        fprintf (stderr, "FAIL [%s seed=%" PRIu64 "]: cannot read the "
                 "rebuilt image: %m\n", what, seed);
        goto out;
      }
      if (fl_model_check (&m, buf, 0, k->size, true, &compared, what)) {
        fprintf (stderr, "FAIL [%s seed=%" PRIu64 "]: acknowledged data "
                 "lost\n", what, seed);
        goto out;
      }
      if (nvariants % qemu_read_every == 1 || qemu_read_every <= 1) {
        if (k->lazy && fl_write_file (path, var.d, var.len) == -1)
          goto out;
        nqemu++;
        memset (buf, 0x5a, k->size);
        if (fl_qemu_read_all (path, NULL, raw, buf, k->size) == -1 ||
            fl_model_check (&m, buf, 0, k->size, true, NULL, what) ||
            (k->snapshot &&
             (fl_qemu_read_all (path, "s1", raw, buf, k->size) == -1 ||
              memcmp (buf, initial, k->size) != 0))) {
          fprintf (stderr, "FAIL [%s seed=%" PRIu64 "]: reading through "
                   "qemu\n", what, seed);
          goto out;
        }
      }
    }
  }

  /* Self-test: the last state compared real data, and a changed byte
   * is noticed.
   */
  {
    uint64_t b = fl_model_known_byte (&m, seed);

    if (compared == 0 || b == UINT64_MAX || layer_read (&var, buf, k->size)) {
      fprintf (stderr, "FAIL [%s]: self-test: nothing to compare\n",
               k->name);
      goto out;
    }
    buf[b] ^= 0x10;
    fprintf (stderr, "self-test: a deliberately changed byte must be "
             "reported:\n");
    if (fl_model_check (&m, buf, 0, k->size, true, NULL, "self-test") != 1) {
      fprintf (stderr, "FAIL [%s]: self-test: a changed byte went "
               "unnoticed\n", k->name);
      goto out;
    }
    /* The starting image, with every write lost, must not pass for the
     * state after the last flush.
     */
    fprintf (stderr, "self-test: the starting image must not pass for the "
             "final state:\n");
    file_copy (&var, &(struct file) { tmpl, tmpl_len, tmpl_len });
    if (layer_read (&var, buf, k->size) == -1 ||
        fl_model_check (&m, buf, 0, k->size, true, NULL,
                        "self-test (every write lost)") == 0) {
      fprintf (stderr, "FAIL [%s]: self-test: losing every write went "
               "unnoticed\n", k->name);
      goto out;
    }
  }
  if (ndropped == 0) {
    fprintf (stderr, "FAIL [%s]: no rebuilt file dropped a write\n",
             k->name);
    goto out;
  }
  printf ("%-8s %5zu writes, %3zu flushes logged; %3ld cut points, %4ld "
          "rebuilt files (%ld dropping writes), %ld qemu-img checks (%ld "
          "with leaks), %ld qemu reads, %lds\n", k->name, rec.n - nfl, nfl,
          ncuts, nvariants, ndropped, nchecks, nleaks, nqemu,
          (long) (time (NULL) - t0));
  fflush (stdout);
  ret = 0;

 out:
  rec_reset ();
  fl_model_free (&m);
  fl_workload_free (&w);
  free (base.d);
  free (var.d);
  free (fl);
  free (ack);
  free (flush_op);
  free (initial);
  free (buf);
  free (data);
  free (tmpl);
  return ret;
}

int
main (int argc, char *argv[])
{
  const char *s = getenv ("SEED"), *t = getenv ("TMPDIR");
  int i, failed = 0;
  size_t j;

  seed = s && *s ? strtoull (s, NULL, 0) : (uint64_t) time (NULL) % 100000;
  if (getenv ("POWERLOSS_CUTS"))
    max_cuts = atol (getenv ("POWERLOSS_CUTS"));
  if (getenv ("POWERLOSS_VARIANTS"))
    variants = atol (getenv ("POWERLOSS_VARIANTS"));
  if (getenv ("POWERLOSS_OPS"))
    nops = atol (getenv ("POWERLOSS_OPS"));
  if (getenv ("POWERLOSS_QEMU_READ_EVERY"))
    qemu_read_every = atol (getenv ("POWERLOSS_QEMU_READ_EVERY"));
  if (max_cuts < 2)
    max_cuts = 2;
  if (variants < 3)
    variants = 3;
  if (nops < 2)
    nops = 2;
  /* A hang is a failure too. */
  alarm (getenv ("POWERLOSS_TIMEOUT") ? atoi (getenv ("POWERLOSS_TIMEOUT"))
                                      : 900);
  printf ("seed=%" PRIu64 " (rerun with SEED=%" PRIu64 ")\n", seed, seed);
  fflush (stdout);
  q2_set_log_hooks (log_error, NULL);

  snprintf (tmpdir, sizeof tmpdir, "%s/test-powerloss-XXXXXX",
            t ? t : "/tmp");
  if (mkdtemp (tmpdir) == NULL) {
    perror ("mkdtemp");
    return 1;
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
