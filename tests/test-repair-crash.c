/* nbdkit-qcow2 tests: crashes and I/O faults during the refcount repair.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Each kind starts from an image qemu-img made from a known raw file,
 * damaged on purpose (the dirty bit with refcounts zeroed, leaks, a
 * refcount too high, an unusable refcount table entry).  The layer
 * opens it (repair=auto or all) on an in-memory file that records
 * every pwrite and flush, and one write request triggers the repair
 * and writes a little guest data; then a flush and close.
 *
 *  - Power loss: for every flush point of the log, the file as a power
 *    cut after it could leave it (the writes before the flush, plus
 *    none, all, a random prefix or a random subset of the later ones).
 *    qemu-img check must accept it (exit 0 or 3: at most leaks), or a
 *    second repair (one write, with the default repair=auto if the file
 *    is dirty, which an interrupted v3 repair must leave it, else
 *    repair=all) must make it clean (exit 0).  Either way every guest byte outside the written range must
 *    read as the starting data.
 *  - Faults: the Nth pwrite or flush fails with EIO, for every N.  The
 *    layer must not crash; the write fails or succeeds; after close, a
 *    second repair must leave an image qemu-img check finds clean, with
 *    the starting data outside the written range.
 *  - No fault: the repaired image is clean at once (exit 0), and reads
 *    back as the starting data plus the write.
 *
 * usage: test-repair-crash [KIND...]
 * environment: SEED, VERBOSE, KEEP
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qcow2-internal.h"
#include "faultlib.h"

enum damage { D_DIRTY, D_LEAKS, D_REFTABLE, D_MIXED };

struct kind {
  const char *name;
  const char *create_opts;
  uint64_t cluster, size;
  enum damage damage;
  enum q2_repair repair;
  bool compress;
  bool snapshot;                /* the start is also snapshot "s1" */
};

#define K(n, o, cl, sz) .name = n, .create_opts = o, .cluster = cl, .size = sz
static const struct kind kinds[] = {
  { K ("dirty", "compat=1.1,lazy_refcounts=on", 64 * KiB, 8 * MiB),
    .damage = D_DIRTY, .repair = Q2_REPAIR_AUTO },
  { K ("leaks", "compat=1.1", 64 * KiB, 8 * MiB),
    .damage = D_LEAKS, .repair = Q2_REPAIR_ALL },
  { K ("reftable", "compat=1.1,lazy_refcounts=on", 64 * KiB, 8 * MiB),
    .damage = D_REFTABLE, .repair = Q2_REPAIR_AUTO },
  { K ("c512-dirty", "compat=1.1,cluster_size=512,lazy_refcounts=on", 512,
       2 * MiB), .damage = D_DIRTY, .repair = Q2_REPAIR_AUTO },
  { K ("compressed-leaks", "compat=1.1", 64 * KiB, 8 * MiB),
    .damage = D_LEAKS, .repair = Q2_REPAIR_ALL, .compress = true },
  /* Every step of the in-place repair, over many refcount blocks:
   * refcounts raised and lowered, COPIED flags cleared (on an L1 and
   * on L2 entries shared with a snapshot) and set.
   */
  { K ("c512-mixed", "compat=1.1,cluster_size=512", 512, 2 * MiB),
    .damage = D_MIXED, .repair = Q2_REPAIR_ALL, .snapshot = true },
};

static uint64_t seed;
static char tmpdir[256];
static long failures;

#define FAIL(...) \
  do { fprintf (stderr, "FAIL: " __VA_ARGS__); fputc ('\n', stderr); \
       failures++; } while (0)

static void
quiet (const char *msg)
{
  if (getenv ("VERBOSE"))
    fprintf (stderr, "    layer: %s\n", msg);
}

/* ---- a growable file image ---- */

struct file {
  uint8_t *d;
  size_t len, cap;
};

static void
file_write (struct file *f, const void *buf, size_t n, uint64_t off)
{
  size_t end = off + n;

  if (end > f->cap) {
    f->cap = end * 2;
    f->d = realloc (f->d, f->cap);
    if (f->d == NULL)
      abort ();
  }
  if (end > f->len) {
    if (off > f->len)
      memset (f->d + f->len, 0, off - f->len);
    f->len = end;
  }
  memcpy (f->d + off, buf, n);
}

static void
file_set (struct file *f, const uint8_t *d, size_t len)
{
  f->len = 0;
  file_write (f, d, len, 0);
}

/* ---- a q2_io over a struct file that records and may fail ---- */

struct event {
  bool flush;
  uint64_t off;
  size_t len;
  uint8_t *data;
};

static struct {
  struct event *ev;
  size_t n, cap;
  bool recording;
  long calls, fail_at;          /* fail the fail_at-th pwrite/flush */
} rec;

struct rio {
  struct q2_io io;
  struct file f;
};

static void
record (bool flush, const void *buf, size_t n, uint64_t off)
{
  struct event *e;

  if (!rec.recording)
    return;
  if (rec.n == rec.cap) {
    rec.cap = rec.cap ? rec.cap * 2 : 256;
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

static bool
inject (void)
{
  return rec.fail_at && ++rec.calls == rec.fail_at;
}

static int
rio_pread (struct q2_io *io, void *buf, size_t n, uint64_t off)
{
  struct file *f = &((struct rio *) io)->f;
  size_t have = off < f->len ? f->len - off : 0;

  if (have > n)
    have = n;
  if (have)
    memcpy (buf, f->d + off, have);
  memset ((uint8_t *) buf + have, 0, n - have);
  return 0;
}

static int
rio_pwrite (struct q2_io *io, const void *buf, size_t n, uint64_t off)
{
  if (inject ())
    return errno = EIO, -1;
  record (false, buf, n, off);
  file_write (&((struct rio *) io)->f, buf, n, off);
  return 0;
}

static int
rio_flush (struct q2_io *io)
{
  if (inject ())
    return errno = EIO, -1;
  record (true, NULL, 0, 0);
  return 0;
}

static int64_t
rio_size (struct q2_io *io)
{
  return ((struct rio *) io)->f.len;
}

static void
rio_close (struct q2_io *io)
{
  free (((struct rio *) io)->f.d);     /* q2_io_close frees the rest */
}

static const struct q2_io_ops rio_ops = {
  .pread = rio_pread, .pwrite = rio_pwrite, .flush = rio_flush,
  .size = rio_size, .close = rio_close,
};

static struct rio *
rio_new (const uint8_t *d, size_t len)
{
  struct rio *r = calloc (1, sizeof *r);

  if (r == NULL)
    abort ();
  r->io.ops = &rio_ops;
  r->io.name = strdup ("image.qcow2");
  file_set (&r->f, d, len);
  return r;
}

/* ---- damage, written from the spec (16-bit refcounts) ---- */

static uint64_t
rc_slot (uint8_t *f, uint64_t c)
{
  unsigned cb = get_be32 (f + QH_CLUSTER_BITS);
  uint64_t rto = get_be64 (f + QH_REFTABLE_OFFSET);
  unsigned rb_bits = cb - 1;
  uint64_t block = get_be64 (f + rto + 8 * (c >> rb_bits));

  if (block == 0)
    abort ();
  return block + 2 * (c & ((UINT64_C (1) << rb_bits) - 1));
}

/* Host clusters of the first few allocated guest clusters. */
static size_t
data_clusters (uint8_t *f, uint64_t *out, size_t max)
{
  unsigned cb = get_be32 (f + QH_CLUSTER_BITS);
  uint64_t l1 = get_be64 (f + QH_L1_OFFSET);
  uint64_t l2 = get_be64 (f + l1) & L1E_OFFSET_MASK, i;
  size_t n = 0;

  for (i = 0; l2 && i < (UINT64_C (1) << (cb - 3)) && n < max; i++) {
    uint64_t e = get_be64 (f + l2 + 8 * i);

    if (!(e & QCOW_OFLAG_COMPRESSED) && (e & L2E_OFFSET_MASK))
      out[n++] = (e & L2E_OFFSET_MASK) >> cb;
  }
  return n;
}

static void
damage (const struct kind *k, uint8_t *f, size_t len)
{
  unsigned cb = get_be32 (f + QH_CLUSTER_BITS);
  uint64_t dc[4], last = (len - 1) >> cb;
  size_t n = data_clusters (f, dc, 4);

  switch (k->damage) {
  case D_DIRTY:
    /* What a crash leaves: references the refcounts do not show yet. */
    put_be64 (f + QH_INCOMPAT, get_be64 (f + QH_INCOMPAT) | 1);
    for (size_t i = 0; i < n; i++)
      put_be16 (f + rc_slot (f, dc[i]), 0);
    put_be16 (f + rc_slot (f, get_be64 (f + QH_L1_OFFSET) >> cb), 0);
    break;
  case D_LEAKS:
    /* Leaks: a data cluster counted twice, the last one three times. */
    if (n)
      put_be16 (f + rc_slot (f, dc[0]), 2);
    put_be16 (f + rc_slot (f, last), 3);
    break;
  case D_MIXED: {
    uint64_t mc[16];
    uint64_t l1 = get_be64 (f + QH_L1_OFFSET);
    uint64_t l2 = get_be64 (f + l1) & L1E_OFFSET_MASK, i;
    size_t m = data_clusters (f, mc, 16), j = 0;

    if (m < 10)
      abort ();
    put_be64 (f + l1, get_be64 (f + l1) | QCOW_OFLAG_COPIED);
    for (i = 0; i < 4; i++)
      put_be16 (f + rc_slot (f, mc[i]), 0);
    for (; i < 6; i++)
      put_be16 (f + rc_slot (f, mc[i]), 5);
    put_be16 (f + rc_slot (f, last), 4);
    /* COPIED on entries 6.. of the shared L2 table: wrong, refcount 2. */
    for (i = 0; i < (UINT64_C (1) << (cb - 3)) && j < 10; i++) {
      uint64_t e = get_be64 (f + l2 + 8 * i);

      if (!(e & L2E_OFFSET_MASK) || (e & QCOW_OFLAG_COMPRESSED))
        continue;
      if (j++ >= 6)
        put_be64 (f + l2 + 8 * i, e | QCOW_OFLAG_COPIED);
    }
    break;
  }
  case D_REFTABLE:
    put_be64 (f + QH_INCOMPAT, get_be64 (f + QH_INCOMPAT) | 1);
    put_be64 (f + get_be64 (f + QH_REFTABLE_OFFSET), UINT64_C (1) << 40);
    break;
  }
}

/* ---- checking a file state ---- */

static uint64_t woff, wlen;     /* the write request */
static uint8_t *wdata;

static int
qemu_check (const uint8_t *d, size_t len, const char *tag)
{
  char path[512], logp[512];
  int r;

  snprintf (path, sizeof path, "%s/%s.qcow2", tmpdir, tag);
  snprintf (logp, sizeof logp, "%s/%s.log", tmpdir, tag);
  if (fl_write_file (path, d, len) == -1)
    abort ();
  r = fl_qemu_check (path, logp);
  if (r != 0 && r != 3 && getenv ("VERBOSE"))
    fl_print_file (logp, 10);
  return r;
}

/* Open a file state (repair as given), write the request, close. */
static int
run_layer (struct rio *r, enum q2_repair repair, bool *write_ok)
{
  struct q2_open_opts o = { .repair = repair };
  struct q2_image *img;

  if (q2_open_io (&r->io, &o, &img) == -1)
    return -1;
  *write_ok = q2_write (img, wdata, wlen, woff) == 0 && q2_flush (img) == 0;
  q2_close (img);               /* closes r */
  return 0;
}

/* Guest bytes outside the written range equal the start; inside, the
 * write's data if want_new.  Reads through the layer.
 */
static int
check_content (const uint8_t *d, size_t len, const uint8_t *initial,
               uint64_t size, bool want_new, const char *tag)
{
  struct q2_open_opts o = { .readonly = true };
  struct q2_io *io = q2_io_mem_new ("state.qcow2", d, len, true);
  struct q2_image *img;
  uint8_t *buf = malloc (size);
  uint64_t i;
  int bad = 0;

  if (io == NULL || buf == NULL)
    abort ();
  if (q2_open_io (io, &o, &img) == -1) {
    q2_io_close (io);
    free (buf);
    FAIL ("%s: cannot open the image to read it", tag);
    return -1;
  }
  if (q2_read (img, buf, size, 0) == -1) {
    FAIL ("%s: reading the guest disk failed", tag);
    bad = 1;
  }
  for (i = 0; !bad && i < size; i++) {
    bool in = i >= woff && i < woff + wlen;

    if (in && want_new ? buf[i] != wdata[i - woff]
        : !in && buf[i] != initial[i]) {
      FAIL ("%s: guest byte %" PRIu64 " is 0x%02x, expected 0x%02x", tag, i,
            buf[i], in ? wdata[i - woff] : initial[i]);
      bad = 1;
    }
  }
  q2_close (img);
  free (buf);
  return bad ? -1 : 0;
}

/* The second repair needs the file after close: keep it apart. */
static int
repair_again (const uint8_t *d, size_t len, struct file *out, bool *ok)
{
  /* A dirty image (v3: the repair marks the image dirty while it runs)
   * must be repaired by default; others need repair=all.
   */
  bool dirty = get_be32 (d + QH_VERSION) >= 3 &&
               (get_be64 (d + QH_INCOMPAT) & QCOW2_INCOMPAT_DIRTY);
  struct q2_open_opts o = { .repair = dirty ? Q2_REPAIR_AUTO
                                            : Q2_REPAIR_ALL };
  struct rio *r = rio_new (d, len);
  struct q2_image *img;

  rec.recording = false;
  rec.fail_at = 0;
  if (q2_open_io (&r->io, &o, &img) == -1) {
    q2_io_close (&r->io);
    return -1;
  }
  *ok = q2_write (img, wdata, wlen, woff) == 0 && q2_flush (img) == 0;
  /* Steal the file before close frees it: close writes the header last,
   * so keep the rio alive by closing through a copy.
   */
  q2_finish_writes (img);
  file_set (out, r->f.d, r->f.len);
  q2_close (img);
  return 0;
}

/* A state must be accepted by qemu-img check, or fixed by a repair. */
static void
judge (const uint8_t *d, size_t len, const uint8_t *initial, uint64_t size,
        const char *tag, long *second_repairs)
{
  struct file out = { 0 };
  bool ok;
  int q = qemu_check (d, len, tag);

  if (q == 0 || q == 3) {
    check_content (d, len, initial, size, false, tag);
    return;
  }
  ++*second_repairs;
  if (repair_again (d, len, &out, &ok) == -1 || !ok) {
    FAIL ("%s: qemu-img check exit %d, and a second repair failed", tag, q);
    free (out.d);
    return;
  }
  q = qemu_check (out.d, out.len, tag);
  if (q != 0)
    FAIL ("%s: qemu-img check exit %d after a second repair", tag, q);
  check_content (out.d, out.len, initial, size, true, tag);
  free (out.d);
}

/* ---- one kind ---- */

/* Has an identical file state been judged already (this kind)? */
static uint64_t *seen;
static size_t nseen, capseen;

static bool
seen_before (const struct file *f)
{
  uint64_t h = 0xcbf29ce484222325ULL ^ f->len;
  size_t i;

  for (i = 0; i < f->len; i++)
    h = (h ^ f->d[i]) * 0x100000001b3ULL;
  for (i = 0; i < nseen; i++)
    if (seen[i] == h)
      return true;
  if (nseen == capseen) {
    capseen = capseen ? capseen * 2 : 64;
    seen = realloc (seen, capseen * sizeof *seen);
    if (seen == NULL)
      abort ();
  }
  seen[nseen++] = h;
  return false;
}

static void
test_kind (const struct kind *k)
{
  char path[512], tag[128];
  uint8_t *initial = malloc (k->size), *start;
  size_t start_len, i, e;
  struct rio *r;
  struct file final = { 0 }, st = { 0 };
  bool ok;
  long states = 0, second = 0, faults = 0, before = failures, nflush = 0;
  uint64_t s = seed ^ 0x7e57;

  snprintf (path, sizeof path, "%s/%s.start.qcow2", tmpdir, k->name);
  if (initial == NULL ||
      fl_make_image (path, k->create_opts, k->compress, k->size,
                     k->size / 4, seed, initial, &start, &start_len) == -1) {
    FAIL ("%s: cannot make the starting image", k->name);
    return;
  }
  if (k->snapshot && fl_snapshot_create (path, "s1", &start, &start_len)) {
    FAIL ("%s: cannot make the snapshot", k->name);
    return;
  }
  damage (k, start, start_len);
  if (qemu_check (start, start_len, "damaged") == 0)
    FAIL ("%s: sanity: the damaged image passes qemu-img check", k->name);
  woff = k->cluster * 3 + 100;
  wlen = k->cluster * 2;
  wdata = malloc (wlen);
  fl_fill (wdata, wlen, seed + 1);

  nseen = 0;
  /* The recorded run, which must repair and write. */
  rec.n = 0;
  rec.recording = true;
  rec.fail_at = 0;
  r = rio_new (start, start_len);
  {
    struct q2_open_opts o = { .repair = k->repair };
    struct q2_image *img;

    if (q2_open_io (&r->io, &o, &img) == -1) {
      FAIL ("%s: open failed", k->name);
      return;
    }
    ok = q2_write (img, wdata, wlen, woff) == 0 && q2_flush (img) == 0;
    q2_finish_writes (img);
    file_set (&final, r->f.d, r->f.len);
    q2_close (img);
  }
  rec.recording = false;
  if (!ok)
    FAIL ("%s: the write after the repair failed", k->name);
  if (qemu_check (final.d, final.len, "final") != 0)
    FAIL ("%s: not clean after the repair and a clean close", k->name);
  check_content (final.d, final.len, initial, k->size, true, "final");

  /* Power loss: the events before b are durable (b is 0 or just past
   * a flush); of those from b to the next flush, none, all, a random
   * prefix or a random subset reached the disk.
   */
  for (e = 0; e <= rec.n; e++) {
    size_t b = e, j, v;

    if (e > 0 && !rec.ev[e - 1].flush)
      continue;
    nflush++;
    for (j = b; j < rec.n && !rec.ev[j].flush; j++)
      ;
    for (v = 0; v < 4; v++) {
      size_t cut = v == 0 ? b : v == 1 ? j : b + fl_below (&s, j - b + 1);

      file_set (&st, start, start_len);
      for (i = 0; i < j; i++) {
        const struct event *ev = &rec.ev[i];

        if (ev->flush)
          continue;
        if (i >= b && (v == 3 ? fl_below (&s, 2) == 0 : i >= cut))
          continue;
        file_write (&st, ev->data, ev->len, ev->off);
      }
      if (seen_before (&st))
        continue;
      snprintf (tag, sizeof tag, "%s-cut%zu-%zu", k->name, e, v);
      judge (st.d, st.len, initial, k->size, tag, &second);
      states++;
    }
  }

  /* Injected EIO at every pwrite and flush of the run. */
  {
    long total;

    rec.fail_at = 1000000000;
    rec.calls = 0;
    r = rio_new (start, start_len);
    run_layer (r, k->repair, &ok);
    total = rec.calls;
    for (rec.fail_at = 1; rec.fail_at <= total; rec.fail_at++) {
      struct q2_open_opts o = { .repair = k->repair };
      struct q2_image *img;
      struct file out = { 0 };
      int q;

      rec.calls = 0;
      r = rio_new (start, start_len);
      snprintf (tag, sizeof tag, "%s-fault%ld", k->name, rec.fail_at);
      if (q2_open_io (&r->io, &o, &img) == -1) {
        q2_io_close (&r->io);
        FAIL ("%s: open failed", tag);
        continue;
      }
      ok = q2_write (img, wdata, wlen, woff) == 0;
      if (ok)
        q2_flush (img);
      q2_finish_writes (img);
      file_set (&st, r->f.d, r->f.len);
      q2_close (img);
      faults++;
      {
        long saved = rec.fail_at;

        q = 0;
        if (repair_again (st.d, st.len, &out, &ok) == -1 || !ok)
          FAIL ("%s: the repair after the fault failed", tag);
        else if ((q = qemu_check (out.d, out.len, tag)) != 0)
          FAIL ("%s: qemu-img check exit %d after the second repair", tag, q);
        else
          check_content (out.d, out.len, initial, k->size, true, tag);
        rec.fail_at = saved;
      }
      free (out.d);
    }
    rec.fail_at = 0;
  }
  printf ("%s: %zu events, %ld flush points, %ld distinct power-loss "
          "states (%ld needed a second repair), %ld injected faults: %s\n", k->name,
          rec.n, nflush, states, second, faults,
          failures == before ? "ok" : "FAILED");
  for (i = 0; i < rec.n; i++)
    free (rec.ev[i].data);
  free (final.d);
  free (st.d);
  free (start);
  free (initial);
  free (wdata);
}

int
main (int argc, char *argv[])
{
  size_t i;
  int a;

  seed = getenv ("SEED") ? strtoull (getenv ("SEED"), NULL, 0)
                         : (uint64_t) getpid ();
  printf ("seed=%" PRIu64 " (rerun with SEED=%" PRIu64 ")\n", seed, seed);
  snprintf (tmpdir, sizeof tmpdir, "%s/repair-crash-XXXXXX",
            getenv ("TMPDIR") ? getenv ("TMPDIR") : "/tmp");
  if (mkdtemp (tmpdir) == NULL) {
    perror ("mkdtemp");
    return 1;
  }
  q2_set_log_hooks (quiet, NULL);
  for (i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
    bool want = argc == 1;

    for (a = 1; a < argc; a++)
      if (strcmp (argv[a], kinds[i].name) == 0)
        want = true;
    if (want)
      test_kind (&kinds[i]);
  }
  free (seen);
  if (getenv ("KEEP"))
    printf ("kept %s\n", tmpdir);
  else
    fl_rm_rf (tmpdir);
  return failures ? 1 : 0;
}
