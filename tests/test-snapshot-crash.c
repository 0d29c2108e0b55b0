/* nbdkit-qcow2 tests: crashes and I/O faults during snapshot-create,
 * snapshot-apply and snapshot-delete.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * The power-loss and fault-injection harnesses of test-powerloss.c and
 * test-faults.c, applied to the three snapshot operations.  Each image
 * kind starts from a qemu-img image with a snapshot "s0" and an active
 * layer that has moved on from it (written by qemu-io); the expected
 * contents (active layer and s0, before and after) come from qemu-img
 * convert, never from the layer.
 *
 * Power loss: a recording q2_io logs every pwrite and flush of one run
 * of the operation (open, operation, close).  For every flush point k,
 * the file is rebuilt as a power cut between flush k and k+1 could
 * leave it: the writes before flush k, plus a subset of those after it
 * (none, all, a prefix, random subsets).  Fault injection: the Nth
 * pwrite or flush of a run fails with EIO (once, or for good), for
 * every N.
 *
 * Every resulting file must
 *  - be in the state before or after the operation, as the header says
 *    (the switch is one write), with the active layer and every
 *    snapshot of that state reading back exactly (through the layer,
 *    and for a sample through qemu-img convert); after a run whose
 *    operation succeeded, the state after;
 *  - pass qemu-img check with at most leaks.  The one exception is the
 *    window QEMU has too (see qcow2-snapshot-write.c): a COPIED flag
 *    that disagrees with a refcount that is too high.  qemu-img check
 *    then reports OFLAG_COPIED errors only on entries that have the
 *    flag and point at a cluster it lists as leaked with one reference
 *    (so nothing shares it), and nothing else; qemu-img check -r leaks
 *    must then leave the image clean.  (-r leaks would fix a missing
 *    flag too, so it alone is not the test.)
 *
 * usage: test-snapshot-crash [KIND...]
 * environment: SEED; SNAPCRASH_VARIANTS (rebuilt files per cut, 5),
 * SNAPCRASH_MAX_N (most fault points per operation, 40),
 * SNAPCRASH_QEMU_READ_EVERY (10), VERBOSE, KEEP
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
  uint64_t size;
  bool compress;
  uint64_t l2_cache;            /* 0: default */
};

static const struct kind kinds[] = {
  { "v3", "compat=1.1", 8 * MiB, false, 0 },
  { "v2", "compat=0.10", 8 * MiB, false, 0 },
  /* Many L2 tables and refcount blocks, a tiny L2 cache. */
  { "c512", "cluster_size=512", 4 * MiB, false, 8 * KiB },
  { "extl2", "extended_l2=on", 8 * MiB, false, 0 },
  { "compressed", "compat=1.1", 8 * MiB, true, 0 },
  { "rc2-4k", "cluster_size=4096,refcount_bits=2", 4 * MiB, false, 0 },
};

enum op { OP_CREATE, OP_APPLY, OP_DELETE };
static const char *const op_name[] = { "create", "apply", "delete" };

static char tmpdir[256];
static uint64_t seed;
static long variants = 5, max_n = 40, qemu_read_every = 10;
static bool verbose;
static long n_errors_logged;

static void
log_error (const char *msg)
{
  n_errors_logged++;
  if (verbose)
    fprintf (stderr, "    layer: %s\n", msg);
}

/* ---- a q2_io over memory that records, and can fail, writes ---- */

struct event {
  bool flush;
  uint64_t off;
  size_t len;
  uint8_t *data;
};

static struct {
  struct event *ev;
  size_t n, cap;
  long calls, fail_at;          /* fail_at 0: never */
  bool sticky;
  long fired;
} rec;

struct rec_io {
  struct q2_io io;
  struct q2_io *inner;
};

static bool
inject (void)
{
  rec.calls++;
  if (rec.fail_at == 0 ||
      !(rec.calls == rec.fail_at || (rec.sticky && rec.calls > rec.fail_at)))
    return false;
  rec.fired++;
  errno = EIO;
  return true;
}

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

  if (inject ())
    return -1;
  if (in->ops->pwrite (in, buf, n, off) == -1)
    return -1;
  record (false, buf, n, off);
  return 0;
}

static int
rio_flush (struct q2_io *io)
{
  if (inject ())
    return -1;
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
rec_reset (long fail_at, bool sticky)
{
  size_t i;

  for (i = 0; i < rec.n; i++)
    free (rec.ev[i].data);
  rec.n = 0;
  rec.calls = 0;
  rec.fail_at = fail_at;
  rec.sticky = sticky;
  rec.fired = 0;
}

/* ---- files in memory ---- */

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
file_set (struct file *dst, const uint8_t *d, size_t len)
{
  if (dst->cap < len) {
    dst->cap = len;
    dst->d = realloc (dst->d, len);
    if (dst->d == NULL)
      abort ();
  }
  memcpy (dst->d, d, len);
  dst->len = len;
}

/* ---- one kind ---- */

struct ctx {
  const struct kind *k;
  uint8_t *tmpl;
  size_t tmpl_len;
  uint8_t *active0, *snap0;     /* guest data before, from qemu-img */
  uint8_t *buf;
  uint64_t l1_offset0;
  char path[300], raw[300], log[300];
  long checks, copied_windows, leaks, olds, news, qemu_reads, runs;
};

/* The state a file is in, and what it must then read as. */
struct expect {
  const uint8_t *active;
  const char *snaps[2];
  const uint8_t *snap_data[2];
  unsigned nsnaps;
};

static void
expected (const struct ctx *c, enum op op, bool after, struct expect *e)
{
  memset (e, 0, sizeof *e);
  e->active = op == OP_APPLY && after ? c->snap0 : c->active0;
  if (op == OP_DELETE && after)
    return;
  e->snaps[0] = "s0";
  e->snap_data[0] = c->snap0;
  e->nsnaps = 1;
  if (op == OP_CREATE && after) {
    e->snaps[1] = "new";
    e->snap_data[1] = c->active0;
    e->nsnaps = 2;
  }
}

static int
layer_read (const struct file *f, const char *snapshot, uint8_t *buf,
            uint64_t size, uint32_t *nb_snaps, uint64_t *l1_off)
{
  struct q2_open_opts o = { .readonly = true, .snapshot = snapshot };
  struct q2_io *io = q2_io_mem_new ("rebuilt.qcow2", f->d, f->len, true);
  struct q2_image *img;
  int r;

  if (io == NULL)
    abort ();
  if (q2_open_io (io, &o, &img) == -1) {
    q2_io_close (io);
    return -1;
  }
  if (nb_snaps)
    *nb_snaps = img->nb_snaps;
  if (l1_off)
    *l1_off = img->h.l1_offset;
  r = q2_size (img) == size ? q2_read (img, buf, size, 0) : -1;
  q2_close (img);
  return r;
}

/* Every complaint of qemu-img check is an OFLAG_COPIED one about an
 * entry that has the flag while the cluster it points at is leaked
 * with exactly one reference ("Leaked cluster C refcount=R
 * reference=1"): the flag anticipates a refcount that is only leaked,
 * and the cluster is shared with nothing.
 */
static bool
only_copied_errors (const char *log, unsigned cluster_bits)
{
  FILE *fp = fopen (log, "r");
  char line[1024];
  uint64_t *leaked = NULL, *flagged = NULL;
  size_t nl = 0, nf = 0, i, j;
  bool ok = true;

  if (fp == NULL)
    return false;
  while (fgets (line, sizeof line, fp)) {
    const char *e = strstr (line, "_entry="), *p;
    unsigned long long c;

    if (sscanf (line, "Leaked cluster %llu", &c) == 1 &&
        (p = strstr (line, "reference=")) && strtoull (p + 10, NULL, 10) == 1) {
      leaked = realloc (leaked, (nl + 1) * sizeof *leaked);
      if (leaked == NULL)
        abort ();
      leaked[nl++] = c;
      continue;
    }
    if (!strstr (line, "ERROR"))
      continue;
    if (!strstr (line, "OFLAG_COPIED") || e == NULL ||
        !(strtoull (e + 7, NULL, 16) & QCOW_OFLAG_COPIED)) {
      ok = false;
      continue;
    }
    flagged = realloc (flagged, (nf + 1) * sizeof *flagged);
    if (flagged == NULL)
      abort ();
    flagged[nf++] = (strtoull (e + 7, NULL, 16) & L2E_OFFSET_MASK)
                    >> cluster_bits;
  }
  fclose (fp);
  for (i = 0; i < nf && ok; i++) {
    for (j = 0; j < nl && leaked[j] != flagged[i]; j++)
      ;
    ok = j < nl;
  }
  free (leaked);
  free (flagged);
  return ok && nf > 0;
}

/* Check one resulting file.  must_be_after: the operation succeeded. */
static int
verify (struct ctx *c, enum op op, const struct file *f, bool must_be_after,
        const char *what)
{
  uint64_t size = c->k->size, l1_off;
  uint32_t nb;
  struct expect e;
  bool after;
  unsigned i;
  int rc;

  c->checks++;
  if (fl_write_file (c->path, f->d, f->len) == -1)
    return -1;
  rc = fl_qemu_check (c->path, c->log);
  if (rc == 2 && only_copied_errors (c->log, get_be32 (c->tmpl + 20))) {
    char *argv[] = { "qemu-img", "check", "-r", "leaks", "-f", "qcow2",
                     c->path, NULL };

    c->copied_windows++;
    fl_run (argv, c->log);
    rc = fl_qemu_check (c->path, c->log);
    if (rc != 0) {
      fl_print_file (c->log, 30);
      fprintf (stderr, "FAIL [%s]: OFLAG_COPIED errors remain after "
               "repairing leaks (check exited %d)\n", what, rc);
      return -1;
    }
    if (fl_write_file (c->path, f->d, f->len) == -1)
      return -1;
  }
  else if (rc == 3)
    c->leaks++;
  else if (rc != 0) {
    fl_print_file (c->log, 30);
    fprintf (stderr, "FAIL [%s]: qemu-img check exited %d\n", what, rc);
    return -1;
  }

  /* Which state: the header says (snapshot count, or the L1 table). */
  if (layer_read (f, NULL, c->buf, size, &nb, &l1_off) == -1) {
    fprintf (stderr, "FAIL [%s]: the layer cannot read the image\n", what);
    return -1;
  }
  after = op == OP_CREATE ? nb == 2 : op == OP_DELETE ? nb == 0
        : l1_off != c->l1_offset0;
  if (must_be_after && !after) {
    fprintf (stderr, "FAIL [%s]: the operation succeeded but the file is "
             "in the state before it\n", what);
    return -1;
  }
  after ? c->news++ : c->olds++;
  expected (c, op, after, &e);
  if (nb != e.nsnaps) {
    fprintf (stderr, "FAIL [%s]: %" PRIu32 " snapshots, expected %u\n",
             what, nb, e.nsnaps);
    return -1;
  }
  if (memcmp (c->buf, e.active, size) != 0) {
    fprintf (stderr, "FAIL [%s]: the active layer (state %s) reads wrong\n",
             what, after ? "after" : "before");
    return -1;
  }
  for (i = 0; i < e.nsnaps; i++) {
    if (layer_read (f, e.snaps[i], c->buf, size, NULL, NULL) == -1 ||
        memcmp (c->buf, e.snap_data[i], size) != 0) {
      fprintf (stderr, "FAIL [%s]: snapshot %s reads wrong\n", what,
               e.snaps[i]);
      return -1;
    }
  }
  if (c->checks % qemu_read_every == 1 || qemu_read_every <= 1) {
    c->qemu_reads++;
    if (fl_qemu_read_all (c->path, NULL, c->raw, c->buf, size) == -1 ||
        memcmp (c->buf, e.active, size) != 0) {
      fprintf (stderr, "FAIL [%s]: qemu reads the active layer wrong\n",
               what);
      return -1;
    }
    for (i = 0; i < e.nsnaps; i++)
      if (fl_qemu_read_all (c->path, e.snaps[i], c->raw, c->buf, size) == -1
          || memcmp (c->buf, e.snap_data[i], size) != 0) {
        fprintf (stderr, "FAIL [%s]: qemu reads snapshot %s wrong\n", what,
                 e.snaps[i]);
        return -1;
      }
  }
  return 0;
}

static int
run_op (struct q2_image *img, enum op op)
{
  switch (op) {
  case OP_CREATE: return q2_snapshot_create (img, "new");
  case OP_APPLY: return q2_snapshot_apply (img, "s0");
  default: return q2_snapshot_delete (img, "s0");
  }
}

/* One run on the template (open, operation, close) with a fault at
 * call fail_at (0: none); the log holds what reached the file.  *ok
 * says whether the operation succeeded.
 */
static int
one_run (struct ctx *c, enum op op, long fail_at, bool sticky, bool *ok)
{
  struct q2_open_opts opts = { .l2_cache_bytes = c->k->l2_cache };
  struct q2_image *img;

  rec_reset (fail_at, sticky);
  c->runs++;
  if (q2_open_io (rec_io_new (c->tmpl, c->tmpl_len), &opts, &img) == -1) {
    fprintf (stderr, "FAIL [%s]: q2_open_io: %m\n", c->k->name);
    return -1;
  }
  *ok = run_op (img, op) == 0;
  q2_close (img);
  return 0;
}

static int
test_kind (const struct kind *k)
{
  struct ctx c = { .k = k };
  struct file base = { 0 }, var = { 0 }, fin = { 0 };
  uint8_t *initial = malloc (k->size);
  time_t t0 = time (NULL);
  uint64_t rs = seed ^ 0x5eed;
  int ret = -1;
  unsigned o;

  c.active0 = malloc (k->size);
  c.snap0 = malloc (k->size);
  c.buf = malloc (k->size);
  if (!initial || !c.active0 || !c.snap0 || !c.buf)
    abort ();
  snprintf (c.path, sizeof c.path, "%s/%s.qcow2", tmpdir, k->name);
  snprintf (c.raw, sizeof c.raw, "%s/%s.raw", tmpdir, k->name);
  snprintf (c.log, sizeof c.log, "%s/%s.log", tmpdir, k->name);

  /* The start: data, snapshot s0, then the active layer moves on. */
  if (fl_make_image (c.path, k->create_opts, k->compress, k->size, 0, seed,
                     initial, &c.tmpl, &c.tmpl_len) == -1 ||
      fl_snapshot_create (c.path, "s0", &c.tmpl, &c.tmpl_len) == -1)
    goto out;
  {
    char w1[64], w2[64], w3[64];
    char *argv[] = { "qemu-io", "-f", "qcow2", "-c", w1, "-c", w2, "-c", w3,
                     c.path, NULL };

    snprintf (w1, sizeof w1, "write -P 0x5a 4096 %" PRIu64, k->size / 8);
    snprintf (w2, sizeof w2, "write -P 0x33 %" PRIu64 " 70000",
              k->size / 2 + 512);
    snprintf (w3, sizeof w3, "write -z %" PRIu64 " 65536", k->size / 4);
    if (fl_run (argv, c.log) != 0) {
      fl_print_file (c.log, 20);
      goto out;
    }
    free (c.tmpl);
    if (fl_read_file (c.path, &c.tmpl, &c.tmpl_len) == -1)
      goto out;
  }
  if (fl_qemu_read_all (c.path, NULL, c.raw, c.active0, k->size) == -1 ||
      fl_qemu_read_all (c.path, "s0", c.raw, c.snap0, k->size) == -1)
    goto out;
  if (memcmp (c.active0, c.snap0, k->size) == 0 ||
      memcmp (c.snap0, initial, k->size) != 0) {
    fprintf (stderr, "FAIL [%s]: sanity: bad starting image\n", k->name);
    goto out;
  }
  c.l1_offset0 = get_be64 (c.tmpl + QH_L1_OFFSET);

  for (o = OP_CREATE; o <= OP_DELETE; o++) {
    enum op op = o;
    size_t *fl = NULL, nfl = 0, i, ev_base = 0;
    long calls, cut, n, step;
    char what[160];
    bool ok;

    /* The clean run: it must succeed and leave a clean image. */
    n_errors_logged = 0;
    if (one_run (&c, op, 0, false, &ok) == -1)
      goto out;
    if (!ok || n_errors_logged) {
      fprintf (stderr, "FAIL [%s %s]: the operation failed without a "
               "fault\n", k->name, op_name[op]);
      goto out;
    }
    calls = rec.calls;
    file_set (&fin, c.tmpl, c.tmpl_len);
    for (i = 0; i < rec.n; i++)
      if (!rec.ev[i].flush)
        file_apply (&fin, &rec.ev[i]);
    snprintf (what, sizeof what, "%s %s, no fault", k->name, op_name[op]);
    if (verify (&c, op, &fin, true, what) == -1)
      goto out;
    if (fl_qemu_check (c.path, c.log) != 0) {
      fl_print_file (c.log, 30);
      fprintf (stderr, "FAIL [%s]: leaks or errors after a clean run\n",
               what);
      goto out;
    }

    /* Power loss after each flush of the clean run. */
    fl = malloc ((rec.n + 1) * sizeof *fl);
    if (fl == NULL)
      abort ();
    for (i = 0; i < rec.n; i++)
      if (rec.ev[i].flush)
        fl[nfl++] = i;
    file_set (&base, c.tmpl, c.tmpl_len);
    for (cut = -1; cut < (long) nfl; cut++) {
      size_t lo = cut < 0 ? 0 : fl[cut] + 1;
      size_t hi = cut + 1 < (long) nfl ? fl[cut + 1] : rec.n;
      long v, nv = hi > lo ? variants : 1;

      for (; ev_base < lo; ev_base++)
        if (!rec.ev[ev_base].flush)
          file_apply (&base, &rec.ev[ev_base]);
      for (v = 0; v < nv; v++) {
        size_t prefix = lo + fl_below (&rs, hi - lo + 1);

        file_set (&var, base.d, base.len);
        for (i = lo; i < hi; i++) {
          bool keep = v == 1 ? true : v == 0 ? false : v == 2 ? i < prefix
                    : fl_below (&rs, 2);

          if (keep)
            file_apply (&var, &rec.ev[i]);
        }
        snprintf (what, sizeof what, "%s %s, power cut after flush %ld of "
                  "%zu, variant %ld (seed=%" PRIu64 ")", k->name,
                  op_name[op], cut, nfl, v, seed);
        if (verify (&c, op, &var, false, what) == -1) {
          free (fl);
          goto out;
        }
      }
    }
    free (fl);

    /* An EIO at each call (a sample if there are many), once or for
     * good.
     */
    step = calls > max_n ? (calls + max_n - 1) / max_n : 1;
    for (n = 1; n <= calls; n += step) {
      bool sticky = (n / step) % 2;

      n_errors_logged = 0;
      if (one_run (&c, op, n, sticky, &ok) == -1)
        goto out;
      file_set (&fin, c.tmpl, c.tmpl_len);
      for (i = 0; i < rec.n; i++)
        if (!rec.ev[i].flush)
          file_apply (&fin, &rec.ev[i]);
      snprintf (what, sizeof what, "%s %s, EIO%s at call %ld of %ld%s "
                "(seed=%" PRIu64 ")", k->name, op_name[op],
                sticky ? " for good" : "", n, calls,
                ok ? ", operation succeeded" : "", seed);
      if (ok && n_errors_logged == 0 && rec.fired == 0) {
        fprintf (stderr, "FAIL [%s]: no fault fired\n", what);
        goto out;
      }
      if (verify (&c, op, &fin, ok, what) == -1)
        goto out;
    }
  }

  printf ("%-10s %4ld runs, %4ld files checked: %ld before, %ld after; %ld "
          "with leaks, %ld with OFLAG_COPIED on leaked refcounts (clean "
          "after -r leaks); %ld qemu reads; %lds\n", k->name, c.runs,
          c.checks, c.olds, c.news, c.leaks, c.copied_windows, c.qemu_reads,
          (long) (time (NULL) - t0));
  fflush (stdout);
  if (c.olds == 0 || c.news == 0) {
    fprintf (stderr, "FAIL [%s]: sanity: both states must be seen\n",
             k->name);
    goto out;
  }
  ret = 0;

 out:
  free (base.d);
  free (var.d);
  free (fin.d);
  free (initial);
  free (c.active0);
  free (c.snap0);
  free (c.buf);
  free (c.tmpl);
  return ret;
}

int
main (int argc, char *argv[])
{
  const char *s = getenv ("SEED"), *t = getenv ("TMPDIR");
  int i, failed = 0;
  size_t j;

  seed = s && *s ? strtoull (s, NULL, 0) : (uint64_t) time (NULL) % 100000;
  if (getenv ("SNAPCRASH_VARIANTS"))
    variants = atol (getenv ("SNAPCRASH_VARIANTS"));
  if (getenv ("SNAPCRASH_MAX_N"))
    max_n = atol (getenv ("SNAPCRASH_MAX_N"));
  if (getenv ("SNAPCRASH_QEMU_READ_EVERY"))
    qemu_read_every = atol (getenv ("SNAPCRASH_QEMU_READ_EVERY"));
  if (variants < 3)
    variants = 3;
  if (max_n < 1)
    max_n = 1;
  verbose = getenv ("VERBOSE") != NULL;
  alarm (900);
  printf ("seed=%" PRIu64 " (rerun with SEED=%" PRIu64 ")\n", seed, seed);
  fflush (stdout);
  q2_set_log_hooks (log_error, NULL);

  snprintf (tmpdir, sizeof tmpdir, "%s/test-snapshot-crash-XXXXXX",
            t ? t : "/tmp");
  if (mkdtemp (tmpdir) == NULL) {
    perror ("mkdtemp");
    return 1;
  }
  for (j = 0; j < sizeof kinds / sizeof kinds[0]; j++) {
    bool want = argc < 2;

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
