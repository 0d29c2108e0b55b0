/* nbdkit-qcow2: the generic slice cache.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Checks, over in-memory files: eviction from a tiny cache returns the
 * right data; dirty slices reach the file on flush and when the cache
 * must evict them, and not before; a cache that depends on another
 * writes nothing until the other's dirty data is written and flushed;
 * discard drops dirty data; and 8 threads doing random reads and writes
 * through a tiny cache never see or leave wrong data.
 */

#include <config.h>

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"
#include "qcow2-cache.h"

static int failures;

#define CHECK(cond, ...)                        \
  do {                                          \
    if (!(cond)) {                              \
      printf ("FAIL: ");                        \
      printf (__VA_ARGS__);                     \
      printf ("\n");                            \
      failures++;                               \
    }                                           \
  } while (0)

#define SLICE 512

/* The byte the pattern puts at file offset off. */
static uint8_t
pattern (uint64_t off)
{
  uint64_t x = off * UINT64_C (0x9e3779b97f4a7c15);

  return x >> 56;
}

static struct q2_io *
pattern_file (const char *name, size_t len)
{
  uint8_t *buf = malloc (len);
  struct q2_io *io;
  size_t i;

  for (i = 0; i < len; i++)
    buf[i] = pattern (i);
  io = q2_io_mem_new (name, buf, len, false);
  free (buf);
  if (io == NULL) {
    perror ("q2_io_mem_new");
    exit (1);
  }
  return io;
}

/* What the file itself holds (bypassing any cache). */
static void
file_bytes (struct q2_io *io, uint64_t off, void *buf, size_t n)
{
  if (q2_io_pread (io, buf, n, off) == -1) {
    printf ("FAIL: pread of the file failed\n");
    exit (1);
  }
}

/* Simple pseudo-random numbers, one state per user. */
static uint64_t
rnd (uint64_t *s)
{
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

/* ---- 1. eviction ---- */

static void
test_eviction (void)
{
  const size_t len = 1024 * 1024;
  struct q2_io *io = pattern_file ("evict", len);
  struct q2_cache *c = q2_cache_new (io, "test", SLICE, 16);
  uint64_t s = 12345, hits, misses, wb;
  unsigned i, bad = 0;

  for (i = 0; i < 20000; i++) {
    uint64_t off = rnd (&s) % (len - 8);
    uint8_t buf[8];
    unsigned j, n = 8;

    off -= off % SLICE > SLICE - 8 ? off % SLICE - (SLICE - 8) : 0;
    if (q2_cache_read (c, off, buf, n) == -1) {
      bad++;
      continue;
    }
    for (j = 0; j < n; j++)
      if (buf[j] != pattern (off + j))
        bad++;
  }
  q2_cache_stats (c, &hits, &misses, &wb);
  CHECK (bad == 0, "eviction: %u wrong bytes read through a 16-slot cache",
         bad);
  /* 2048 slices through 16 slots: nearly every read must miss. */
  CHECK (misses > 10000, "eviction: only %" PRIu64 " misses; the cache "
         "cannot be holding 16 slots", misses);
  CHECK (hits + misses == 20000, "eviction: %" PRIu64 " lookups counted",
         hits + misses);
  CHECK (wb == 0, "eviction: clean slices were written back");
  printf ("ok: eviction: 20000 random reads over 2048 slices with 16 slots "
          "(%" PRIu64 " hits, %" PRIu64 " misses)\n", hits, misses);

  /* A second pass in key order, each slice twice: the second is a hit. */
  for (i = 0; i < 64; i++) {
    uint8_t buf[4];

    q2_cache_read (c, i * SLICE, buf, 4);
    q2_cache_read (c, i * SLICE + 4, buf, 4);
    CHECK (buf[0] == pattern (i * SLICE + 4), "re-read of slice %u", i);
  }
  q2_cache_stats (c, &hits, &misses, &wb);
  q2_cache_free (c);
  q2_io_close (io);

  /* Accesses that span two slices are refused, not half done. */
  io = pattern_file ("span", 4096);
  c = q2_cache_new (io, "test", SLICE, 16);
  {
    uint8_t buf[16];
    CHECK (q2_cache_read (c, SLICE - 4, buf, 8) == -1,
           "a read across a slice boundary was accepted");
    CHECK (q2_cache_write (c, SLICE - 4, buf, 8) == -1,
           "a write across a slice boundary was accepted");
  }
  q2_cache_free (c);
  q2_io_close (io);
}

/* ---- 2. write-back ---- */

static void
test_writeback (void)
{
  const size_t len = 64 * SLICE;
  struct q2_io *io = pattern_file ("wb", len);
  struct q2_cache *c = q2_cache_new (io, "test", SLICE, 16);
  uint8_t v[8], got[8];
  unsigned i, in_file;

  /* Not written before a flush. */
  memset (v, 0x11, sizeof v);
  CHECK (q2_cache_write (c, 3 * SLICE + 100, v, 8) == 0, "cache write");
  file_bytes (io, 3 * SLICE + 100, got, 8);
  CHECK (got[0] == pattern (3 * SLICE + 100),
         "write-back: dirty data reached the file before any flush");
  CHECK (q2_cache_read (c, 3 * SLICE + 100, got, 8) == 0 &&
         memcmp (got, v, 8) == 0, "write-back: cache does not return the "
         "data just written");
  CHECK (q2_cache_flush (c) == 0, "flush failed");
  file_bytes (io, 3 * SLICE + 100, got, 8);
  CHECK (memcmp (got, v, 8) == 0, "write-back: flush did not write the "
         "dirty slice");
  /* The rest of the slice was preserved (read-modify-write). */
  file_bytes (io, 3 * SLICE + 92, got, 8);
  CHECK (got[0] == pattern (3 * SLICE + 92) &&
         got[7] == pattern (3 * SLICE + 99),
         "write-back: the bytes around the update were lost");
  printf ("ok: write-back on flush\n");

  /* Eviction of dirty slices: dirty 40 slices in a 16-slot cache.  The
   * cache can only hold 16, so at least 24 must be in the file before
   * any flush, and all 40 must read back right.
   */
  for (i = 0; i < 40; i++) {
    memset (v, 0x40 + i, sizeof v);
    CHECK (q2_cache_write (c, (uint64_t) (i + 10) * SLICE + 8, v, 8) == 0,
           "cache write %u", i);
  }
  for (i = 0, in_file = 0; i < 40; i++) {
    file_bytes (io, (uint64_t) (i + 10) * SLICE + 8, got, 8);
    in_file += got[0] == 0x40 + i;
  }
  CHECK (in_file >= 24, "write-back: only %u of 40 dirty slices reached "
         "the file, but only 16 fit in the cache", in_file);
  for (i = 0; i < 40; i++) {
    CHECK (q2_cache_read (c, (uint64_t) (i + 10) * SLICE + 8, got, 8) == 0 &&
           got[0] == 0x40 + i && got[7] == 0x40 + i,
           "write-back: slice %u reads back wrong after eviction", i);
  }
  CHECK (q2_cache_flush (c) == 0, "flush failed");
  for (i = 0; i < 40; i++) {
    file_bytes (io, (uint64_t) (i + 10) * SLICE + 8, got, 8);
    CHECK (got[0] == 0x40 + i && got[7] == 0x40 + i,
           "write-back: slice %u not in the file after flush", i);
  }
  printf ("ok: write-back on eviction (%u of 40 slices written before the "
          "flush)\n", in_file);
  q2_cache_free (c);
  q2_io_close (io);
}

/* ---- 3. dependencies, with a logging file ---- */

#define MAX_LOG 4096

struct log_entry {
  char file;                    /* 'A' or 'B' */
  char op;                      /* 'w' write, 'f' flush */
  uint64_t off;
};

static struct log_entry oplog[MAX_LOG];
static size_t nlog;
static pthread_mutex_t loglock = PTHREAD_MUTEX_INITIALIZER;

struct log_io {
  struct q2_io io;
  struct q2_io *inner;
  char tag;
};

static void
log_op (struct log_io *l, char op, uint64_t off)
{
  pthread_mutex_lock (&loglock);
  if (nlog < MAX_LOG)
    oplog[nlog++] = (struct log_entry) { l->tag, op, off };
  pthread_mutex_unlock (&loglock);
}

static int
log_pread (struct q2_io *io, void *buf, size_t n, uint64_t off)
{
  struct log_io *l = (struct log_io *) io;

  return l->inner->ops->pread (l->inner, buf, n, off);
}

static int
log_pwrite (struct q2_io *io, const void *buf, size_t n, uint64_t off)
{
  struct log_io *l = (struct log_io *) io;

  log_op (l, 'w', off);
  return l->inner->ops->pwrite (l->inner, buf, n, off);
}

static int
log_flush (struct q2_io *io)
{
  struct log_io *l = (struct log_io *) io;

  log_op (l, 'f', 0);
  return l->inner->ops->flush (l->inner);
}

static int64_t
log_size (struct q2_io *io)
{
  struct log_io *l = (struct log_io *) io;

  return l->inner->ops->size (l->inner);
}

static void
log_close (struct q2_io *io)
{
  struct log_io *l = (struct log_io *) io;

  q2_io_close (l->inner);
}

static const struct q2_io_ops log_ops = {
  .pread = log_pread,
  .pwrite = log_pwrite,
  .flush = log_flush,
  .size = log_size,
  .close = log_close,
};

static struct q2_io *
log_file (char tag, size_t len)
{
  struct log_io *l = calloc (1, sizeof *l);
  char name[] = "log-X";

  name[4] = tag;
  l->io.ops = &log_ops;
  l->io.name = strdup (name);
  l->inner = pattern_file (name, len);
  l->tag = tag;
  return &l->io;
}

/* Every B write must come before some B flush that comes before the
 * first A write.  Returns the number of A writes seen.
 */
static size_t
check_order (const char *what, size_t nb_expected)
{
  size_t i, first_a = nlog, last_b = 0, nb = 0, na = 0;
  bool b_written = false, flushed_after = false;

  for (i = 0; i < nlog; i++) {
    if (oplog[i].file == 'A' && oplog[i].op == 'w') {
      if (first_a == nlog)
        first_a = i;
      na++;
    }
    if (oplog[i].file == 'B' && oplog[i].op == 'w') {
      last_b = i;
      b_written = true;
      nb++;
    }
  }
  CHECK (first_a < nlog, "%s: A was never written", what);
  CHECK (nb == nb_expected, "%s: %zu B writes, expected %zu", what, nb,
         nb_expected);
  if (b_written) {
    CHECK (last_b < first_a, "%s: B written (log entry %zu) after A "
           "(log entry %zu)", what, last_b, first_a);
    for (i = last_b + 1; i < first_a; i++)
      if (oplog[i].file == 'B' && oplog[i].op == 'f')
        flushed_after = true;
    CHECK (flushed_after, "%s: B's file not flushed between B's writes and "
           "A's", what);
  }
  return na;
}

static void
print_log (void)
{
  size_t i;

  printf ("   log:");
  for (i = 0; i < nlog && i < 40; i++)
    printf (" %c%c", oplog[i].file, oplog[i].op);
  printf ("%s\n", nlog > 40 ? " ..." : "");
}

static void
test_dependency (void)
{
  struct q2_io *fa = log_file ('A', 64 * SLICE);
  struct q2_io *fb = log_file ('B', 64 * SLICE);
  struct q2_cache *a = q2_cache_new (fa, "A", SLICE, 16);
  struct q2_cache *b = q2_cache_new (fb, "B", SLICE, 16);
  uint8_t v[8] = { 1, 2, 3, 4, 5, 6, 7, 8 }, got[8];
  unsigned i;
  size_t na;

  q2_cache_set_dependency (a, b);

  /* Flush of A writes B's dirty slices first, then flushes B. */
  nlog = 0;
  q2_cache_write (a, 0, v, 8);
  q2_cache_write (b, SLICE, v, 8);
  q2_cache_write (b, 5 * SLICE, v, 8);
  q2_cache_write (a, 7 * SLICE, v, 8);
  CHECK (nlog == 0, "dependency: something was written before a flush");
  CHECK (q2_cache_flush (a) == 0, "flush of A failed");
  print_log ();
  na = check_order ("flush of A", 2);
  CHECK (na == 2, "flush of A: %zu A writes, expected 2", na);
  file_bytes (fb, 5 * SLICE, got, 8);
  CHECK (memcmp (got, v, 8) == 0, "flush of A: B's data not in B's file");
  printf ("ok: flush of A writes and flushes B first\n");

  /* Flushing B alone never writes A. */
  nlog = 0;
  q2_cache_write (a, 2 * SLICE, v, 8);
  q2_cache_write (b, 2 * SLICE, v, 8);
  CHECK (q2_cache_flush (b) == 0, "flush of B failed");
  for (i = 0; i < nlog; i++)
    CHECK (oplog[i].file == 'B', "flush of B wrote to A");
  CHECK (q2_cache_flush (a) == 0, "flush of A failed");
  printf ("ok: flush of B does not touch A\n");

  /* Eviction: fill A with dirty slices (16 slots) while B has dirty
   * data; A's next miss must write back, and B must go first.
   */
  nlog = 0;
  q2_cache_write (b, 9 * SLICE, v, 8);
  for (i = 0; i < 17; i++)
    q2_cache_write (a, (uint64_t) (20 + i) * SLICE, v, 8);
  print_log ();
  na = check_order ("eviction of A", 1);
  CHECK (na >= 1, "eviction of A: nothing written");
  printf ("ok: eviction in A writes and flushes B first (%zu A writes)\n",
          na);

  /* An empty flush of A writes nothing at all. */
  CHECK (q2_cache_flush (a) == 0 && q2_cache_flush (b) == 0, "flush");
  nlog = 0;
  CHECK (q2_cache_flush (a) == 0, "flush of clean A failed");
  CHECK (nlog == 0 || (nlog == 1 && oplog[0].op == 'f'),
         "flush of a clean cache wrote %zu times", nlog);

  q2_cache_free (a);
  q2_cache_free (b);
  q2_io_close (fa);
  q2_io_close (fb);
}

/* ---- 4. discard ---- */

static void
test_discard (void)
{
  struct q2_io *io = pattern_file ("discard", 64 * SLICE);
  struct q2_cache *c = q2_cache_new (io, "test", SLICE, 16);
  uint8_t v[8], got[8];
  unsigned i;

  memset (v, 0x77, sizeof v);
  for (i = 0; i < 8; i++)
    q2_cache_write (c, (uint64_t) i * SLICE + 16, v, 8);
  /* Drop slices 2..5 without writing them back. */
  q2_cache_discard (c, 2 * SLICE, 4 * SLICE);
  CHECK (q2_cache_flush (c) == 0, "flush failed");
  for (i = 0; i < 8; i++) {
    bool dropped = i >= 2 && i < 6;

    file_bytes (io, (uint64_t) i * SLICE + 16, got, 8);
    CHECK (dropped ? got[0] == pattern (i * SLICE + 16) : got[0] == 0x77,
           "discard: slice %u %s", i,
           dropped ? "was written back after discard" : "was lost");
    /* A read after discard loads the file again. */
    CHECK (q2_cache_read (c, (uint64_t) i * SLICE + 16, got, 8) == 0 &&
           got[0] == (dropped ? pattern (i * SLICE + 16) : 0x77),
           "discard: slice %u reads back wrong", i);
  }
  printf ("ok: discard drops dirty slices in the range, keeps the rest\n");
  q2_cache_free (c);
  q2_io_close (io);
}

/* ---- 5. threads ---- */

#define NTHREADS 8
#define REGION_SLICES 48
#define OPS_PER_THREAD 150000

struct worker {
  pthread_t tid;
  unsigned id;
  struct q2_cache *c;
  uint8_t shadow[REGION_SLICES * SLICE];
  unsigned errors;
};

static volatile bool stop_flusher;

static void *
flusher (void *arg)
{
  struct q2_cache *c = arg;

  while (!stop_flusher) {
    if (q2_cache_flush (c) == -1)
      return (void *) 1;
    sched_yield ();
  }
  return NULL;
}

static void *
work (void *arg)
{
  struct worker *w = arg;
  uint64_t base = (uint64_t) w->id * REGION_SLICES * SLICE;
  uint64_t s = 0x1234567ULL * (w->id + 1);
  unsigned i;

  for (i = 0; i < REGION_SLICES * SLICE; i++)
    w->shadow[i] = pattern (base + i);
  for (i = 0; i < OPS_PER_THREAD; i++) {
    uint64_t r = rnd (&s);
    uint64_t slice = r % REGION_SLICES;
    size_t n = 1 + (r >> 8) % 16;
    uint64_t in = (r >> 16) % (SLICE - n + 1);
    uint64_t off = slice * SLICE + in;
    uint8_t buf[16];

    if ((r >> 40) % 3 == 0) {
      memset (buf, (uint8_t) (r >> 48) | 1, n);
      buf[0] = w->id;
      if (q2_cache_write (w->c, base + off, buf, n) == -1) {
        w->errors++;
        continue;
      }
      memcpy (w->shadow + off, buf, n);
    }
    else {
      if (q2_cache_read (w->c, base + off, buf, n) == -1 ||
          memcmp (buf, w->shadow + off, n) != 0)
        w->errors++;
    }
  }
  return NULL;
}

static void
test_threads (void)
{
  size_t len = (size_t) NTHREADS * REGION_SLICES * SLICE;
  struct q2_io *io = pattern_file ("threads", len);
  struct q2_cache *c = q2_cache_new (io, "test", SLICE, 16);
  static struct worker w[NTHREADS];
  pthread_t ft;
  void *fr;
  unsigned i, errors = 0, wrong_in_file = 0;
  uint8_t *file = malloc (len);

  stop_flusher = false;
  pthread_create (&ft, NULL, flusher, c);
  for (i = 0; i < NTHREADS; i++) {
    w[i].id = i;
    w[i].c = c;
    w[i].errors = 0;
    pthread_create (&w[i].tid, NULL, work, &w[i]);
  }
  for (i = 0; i < NTHREADS; i++) {
    pthread_join (w[i].tid, NULL);
    errors += w[i].errors;
  }
  stop_flusher = true;
  pthread_join (ft, &fr);
  CHECK (fr == NULL, "threads: a concurrent flush failed");
  CHECK (errors == 0, "threads: %u reads returned wrong data or failed",
         errors);
  CHECK (q2_cache_flush (c) == 0, "threads: final flush failed");
  file_bytes (io, 0, file, len);
  for (i = 0; i < NTHREADS; i++)
    if (memcmp (file + (size_t) i * REGION_SLICES * SLICE, w[i].shadow,
                REGION_SLICES * SLICE) != 0)
      wrong_in_file++;
  CHECK (wrong_in_file == 0, "threads: %u regions wrong in the file after "
         "the final flush", wrong_in_file);
  printf ("ok: %d threads x %d random reads/writes through 16 slots, with "
          "a concurrent flusher\n", NTHREADS, OPS_PER_THREAD);
  free (file);
  q2_cache_free (c);
  q2_io_close (io);
}

int
main (void)
{
  test_eviction ();
  test_writeback ();
  test_dependency ();
  test_discard ();
  test_threads ();
  if (failures) {
    printf ("%d cache check(s) failed\n", failures);
    return 1;
  }
  printf ("all cache checks passed\n");
  return 0;
}
