/* nbdkit-qcow2: a small, locked, write-back cache of table slices.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Slots live in a fixed array, found through a chained hash of their
 * file offsets and evicted by the clock algorithm.  Loading or writing
 * a slot drops the lock for the I/O; the slot's state keeps others off
 * it meanwhile, and they wait on the condition variable.
 *
 * Crash-ordering rule enforced here: a cache with a dependency (the L2
 * cache depends on the refcount cache) writes nothing back until the
 * dependency has been written back and flushed to stable storage.
 */

#include <config.h>

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"
#include "qcow2-cache.h"

#define MIN_SLOTS 16

enum slot_state { SLOT_FREE, SLOT_LOADING, SLOT_VALID };

struct slot {
  uint64_t key;                 /* file offset of the slice */
  int32_t next;                 /* hash chain, -1 ends it */
  uint8_t state;
  bool ref;                     /* clock: used since the hand passed */
  bool dirty;
  bool writing;                 /* a write-back of this slot is under way */
  uint8_t *data;
};

struct q2_cache {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  struct q2_io *io;
  const char *what;
  size_t slice_size;
  size_t n;
  struct slot *slots;
  uint8_t *mem;
  int32_t *buckets;
  size_t nbuckets;              /* a power of 2 */
  size_t hand;
  struct q2_cache *dep;
  struct q2_io *barrier;
  uint64_t hits, misses, writebacks;
};

struct q2_cache *
q2_cache_new (struct q2_io *io, const char *what, size_t slice_size,
              size_t nslices)
{
  struct q2_cache *c = calloc (1, sizeof *c);
  size_t i;

  if (c == NULL)
    return NULL;
  if (nslices < MIN_SLOTS)
    nslices = MIN_SLOTS;
  c->io = io;
  c->what = what;
  c->slice_size = slice_size;
  c->n = nslices;
  for (c->nbuckets = 1; c->nbuckets < nslices * 2; c->nbuckets <<= 1)
    ;
  c->slots = calloc (nslices, sizeof *c->slots);
  c->buckets = malloc (c->nbuckets * sizeof *c->buckets);
  c->mem = malloc (nslices * slice_size);
  if (!c->slots || !c->buckets || !c->mem) {
    q2_cache_free (c);
    return NULL;
  }
  for (i = 0; i < nslices; i++) {
    c->slots[i].data = c->mem + i * slice_size;
    c->slots[i].next = -1;
  }
  for (i = 0; i < c->nbuckets; i++)
    c->buckets[i] = -1;
  pthread_mutex_init (&c->lock, NULL);
  pthread_cond_init (&c->cond, NULL);
  return c;
}

void
q2_cache_free (struct q2_cache *c)
{
  if (c == NULL)
    return;
  if (c->slots) {
    pthread_mutex_destroy (&c->lock);
    pthread_cond_destroy (&c->cond);
  }
  free (c->slots);
  free (c->buckets);
  free (c->mem);
  free (c);
}

size_t
q2_cache_slice_size (const struct q2_cache *c)
{
  return c->slice_size;
}

void
q2_cache_set_dependency (struct q2_cache *c, struct q2_cache *dep)
{
  c->dep = dep;
}

void
q2_cache_set_barrier (struct q2_cache *c, struct q2_io *io)
{
  c->barrier = io;
}

static size_t
bucket_of (const struct q2_cache *c, uint64_t key)
{
  uint64_t h = (key / c->slice_size) * UINT64_C (0x9e3779b97f4a7c15);

  return (h >> 32) & (c->nbuckets - 1);
}

static int32_t
lookup (const struct q2_cache *c, uint64_t key)
{
  int32_t i;

  for (i = c->buckets[bucket_of (c, key)]; i >= 0; i = c->slots[i].next)
    if (c->slots[i].key == key)
      return i;
  return -1;
}

static void
hash_insert (struct q2_cache *c, int32_t i)
{
  size_t b = bucket_of (c, c->slots[i].key);

  c->slots[i].next = c->buckets[b];
  c->buckets[b] = i;
}

static void
hash_remove (struct q2_cache *c, int32_t i)
{
  int32_t *p = &c->buckets[bucket_of (c, c->slots[i].key)];

  while (*p != i)
    p = &c->slots[*p].next;
  *p = c->slots[i].next;
  c->slots[i].next = -1;
}

/* Clock: a free slot, or a clean idle one not used since the hand last
 * passed.  Two sweeps clear every reference bit, so failure means every
 * slot is dirty or busy.
 */
static int32_t
pick_victim (struct q2_cache *c)
{
  size_t tries;

  for (tries = 0; tries < 2 * c->n; tries++) {
    struct slot *s = &c->slots[c->hand];
    int32_t i = c->hand;

    c->hand = (c->hand + 1) % c->n;
    if (s->state == SLOT_FREE)
      return i;
    if (s->state != SLOT_VALID || s->dirty || s->writing)
      continue;
    if (s->ref) {
      s->ref = false;
      continue;
    }
    return i;
  }
  return -1;
}

static int flush_locked (struct q2_cache *c);

/* Return a valid slot holding key, loading it if needed.  Lock held. */
static int32_t
get_slot (struct q2_cache *c, uint64_t key)
{
  for (;;) {
    int32_t i = lookup (c, key);
    int r;

    if (i >= 0) {
      if (c->slots[i].state == SLOT_LOADING) {
        pthread_cond_wait (&c->cond, &c->lock);
        continue;
      }
      c->slots[i].ref = true;
      c->hits++;
      return i;
    }
    i = pick_victim (c);
    if (i < 0) {
      /* Everything is dirty or busy: write back, or wait for loads. */
      if (flush_locked (c) == -1)
        return -1;
      if (pick_victim (c) < 0)
        pthread_cond_wait (&c->cond, &c->lock);
      continue;
    }
    if (c->slots[i].state == SLOT_VALID)
      hash_remove (c, i);
    c->slots[i].key = key;
    c->slots[i].state = SLOT_LOADING;
    hash_insert (c, i);
    c->misses++;

    pthread_mutex_unlock (&c->lock);
    r = c->io->ops->pread (c->io, c->slots[i].data, c->slice_size, key);
    pthread_mutex_lock (&c->lock);

    if (r == -1) {
      hash_remove (c, i);
      c->slots[i].state = SLOT_FREE;
    }
    else {
      c->slots[i].state = SLOT_VALID;
      c->slots[i].ref = true;
    }
    pthread_cond_broadcast (&c->cond);
    return r == -1 ? -1 : i;
  }
}

static int
check_span (struct q2_cache *c, uint64_t off, size_t n)
{
  if (n == 0 || n > c->slice_size ||
      off / c->slice_size != (off + n - 1) / c->slice_size) {
    errno = EINVAL;
    q2_error ("%s cache: access at %" PRIu64 "+%zu spans slices",
              c->what, off, n);
    return -1;
  }
  return 0;
}

/* Copy between buf and [off, off+n) of a slice; writing marks it dirty. */
static int
copy_slice (struct q2_cache *c, uint64_t off, void *buf, size_t n, bool write)
{
  uint64_t key = off - off % c->slice_size;
  int32_t i;

  if (check_span (c, off, n) == -1)
    return -1;
  pthread_mutex_lock (&c->lock);
  i = get_slot (c, key);
  if (i >= 0 && write) {
    memcpy (c->slots[i].data + (off - key), buf, n);
    c->slots[i].dirty = true;
  }
  else if (i >= 0)
    memcpy (buf, c->slots[i].data + (off - key), n);
  pthread_mutex_unlock (&c->lock);
  return i >= 0 ? 0 : -1;
}

int
q2_cache_read (struct q2_cache *c, uint64_t off, void *buf, size_t n)
{
  return copy_slice (c, off, buf, n, false);
}

int
q2_cache_write (struct q2_cache *c, uint64_t off, const void *buf, size_t n)
{
  return copy_slice (c, off, (void *) buf, n, true);
}

/* Write one dirty slot back from a private copy, so that updates may
 * continue while the I/O runs.  Lock held; dropped during the write.
 */
static int
writeback_slot (struct q2_cache *c, int32_t i, uint8_t *copy)
{
  struct slot *s = &c->slots[i];
  uint64_t key = s->key;
  int r;

  while (s->writing)
    pthread_cond_wait (&c->cond, &c->lock);
  if (!s->dirty || s->state != SLOT_VALID || s->key != key)
    return 0;
  memcpy (copy, s->data, c->slice_size);
  s->dirty = false;
  s->writing = true;
  c->writebacks++;

  pthread_mutex_unlock (&c->lock);
  r = c->io->ops->pwrite (c->io, copy, c->slice_size, key);
  pthread_mutex_lock (&c->lock);

  s->writing = false;
  if (r == -1)
    s->dirty = true;            /* keep it: a later flush retries */
  pthread_cond_broadcast (&c->cond);
  return r;
}

static bool
has_dirty (const struct q2_cache *c)
{
  size_t i;

  for (i = 0; i < c->n; i++)
    if (c->slots[i].dirty)
      return true;
  return false;
}

/* Lock held.  The dependency is flushed with our lock dropped: lock
 * order is always dependent before dependency, never both at once.
 */
static int
flush_locked (struct q2_cache *c)
{
  uint8_t *copy;
  size_t i;
  int r = 0;

  if (!has_dirty (c))
    return 0;
  if (c->dep || c->barrier) {
    pthread_mutex_unlock (&c->lock);
    if (c->dep) {
      r = q2_cache_flush (c->dep);
      if (r == 0)
        r = c->dep->io->ops->flush (c->dep->io);
    }
    if (r == 0 && c->barrier)
      r = c->barrier->ops->flush (c->barrier);
    pthread_mutex_lock (&c->lock);
    if (r == -1)
      return -1;
  }
  copy = malloc (c->slice_size);
  if (copy == NULL)
    return Q2_FAIL (ENOMEM, "%s cache: malloc: %m", c->what);
  for (i = 0; i < c->n && r == 0; i++)
    if (c->slots[i].dirty)
      r = writeback_slot (c, i, copy);
  free (copy);
  return r;
}

int
q2_cache_flush (struct q2_cache *c)
{
  int r;

  pthread_mutex_lock (&c->lock);
  r = flush_locked (c);
  pthread_mutex_unlock (&c->lock);
  return r;
}

void
q2_cache_discard (struct q2_cache *c, uint64_t off, uint64_t len)
{
  size_t i;

  pthread_mutex_lock (&c->lock);
  for (i = 0; i < c->n; i++) {
    struct slot *s = &c->slots[i];

    while (s->state == SLOT_VALID && s->writing)
      pthread_cond_wait (&c->cond, &c->lock);
    if (s->state == SLOT_VALID && s->key >= off && s->key - off < len) {
      hash_remove (c, i);
      s->state = SLOT_FREE;
      s->dirty = false;
    }
  }
  pthread_mutex_unlock (&c->lock);
}

void
q2_cache_stats (struct q2_cache *c, uint64_t *hits, uint64_t *misses,
                uint64_t *writebacks)
{
  pthread_mutex_lock (&c->lock);
  *hits = c->hits;
  *misses = c->misses;
  *writebacks = c->writebacks;
  pthread_mutex_unlock (&c->lock);
}
