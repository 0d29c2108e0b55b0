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

/* ---- one kind ---- */

static char tmpdir[256];
static uint64_t seed;
static size_t nops = 100;
static long max_cuts = 60, variants = 6, qemu_read_every = 10;

/* Read the whole guest disk of a file image through the layer. */
static int
layer_read (const struct fl_file *f, uint8_t *buf, uint64_t size)
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
  struct fl_file base = { 0 }, var = { 0 };
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
  fl_io_reset (0, 0, false, true);
  fl_errors_logged = 0;
  if (q2_open_io (fl_io_mem (tmpl, tmpl_len), &opts, &img) == -1) {
    fprintf (stderr, "FAIL [%s]: q2_open_io: %m\n", k->name);
    return -1;
  }
  for (i = 0; i < w.n; i++) {
    const struct fl_op *op = &w.ops[i];
    int r = 0;

    switch (op->kind) {
    case FL_WRITE:
      fl_fill_data (data, op->len, op->seed, k->compress_writes);
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
      ack[nflush++] = fl_io.n;    /* acknowledged after these events */
    }
  }
  q2_close (img);
  if (fl_errors_logged) {
    fprintf (stderr, "FAIL [%s]: the layer reported errors\n", k->name);
    return -1;
  }

  fl = malloc ((fl_io.n + 1) * sizeof *fl);
  if (fl == NULL)
    abort ();
  for (i = 0; i < fl_io.n; i++)
    if (fl_io.ev[i].flush)
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
      if (!fl_io.ev[ev_base].flush)
        fl_file_apply (&base, &fl_io.ev[ev_base]);
    cand_lo = cut < 0 ? 0 : fl[cut] + 1;
    hi = cut + 1 < (long) nfl ? (long) fl[cut + 1] : (long) fl_io.n;
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
          fl_fill_data (data, op->len, op->seed, k->compress_writes);
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

      fl_file_set (&var, base.d, base.len);
      for (i = cand_lo; i < cand_hi; i++) {
        bool keep = v == 1 ? true : v == 0 ? false : v == 2 ? i < prefix
                  : fl_below (&rs, 2);

        if (keep)
          fl_file_apply (&var, &fl_io.ev[i]);
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
    fl_file_set (&var, tmpl, tmpl_len);
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
          "with leaks), %ld qemu reads, %lds\n", k->name, fl_io.n - nfl, nfl,
          ncuts, nvariants, ndropped, nchecks, nleaks, nqemu,
          (long) (time (NULL) - t0));
  fflush (stdout);
  ret = 0;

 out:
  fl_io_reset (0, 0, false, false);
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
  int failed = 0;
  size_t j;

  max_cuts = fl_env_long ("POWERLOSS_CUTS", max_cuts);
  variants = fl_env_long ("POWERLOSS_VARIANTS", variants);
  nops = fl_env_long ("POWERLOSS_OPS", nops);
  qemu_read_every = fl_env_long ("POWERLOSS_QEMU_READ_EVERY", qemu_read_every);
  if (max_cuts < 2)
    max_cuts = 2;
  if (variants < 3)
    variants = 3;
  if (nops < 2)
    nops = 2;
  /* A hang is a failure too. */
  alarm (fl_env_long ("POWERLOSS_TIMEOUT", 900));
  seed = fl_seed ();
  q2_set_log_hooks (fl_log_error, NULL);

  if (fl_mkdtemp (tmpdir, sizeof tmpdir, "test-powerloss") == -1)
    return 1;
  for (j = 0; j < sizeof kinds / sizeof kinds[0]; j++)
    if (fl_wanted (argc, argv, kinds[j].name, !kinds[j].compress_writes) &&
        test_kind (&kinds[j]) == -1)
      failed++;
  fl_keep_or_remove (tmpdir);
  if (failed)
    printf ("%d image kinds FAILED (seed=%" PRIu64 ")\n", failed, seed);
  return failed ? 1 : 0;
}
