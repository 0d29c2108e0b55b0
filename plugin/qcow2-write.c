/* nbdkit-qcow2: writing, zeroing, discarding and flushing.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Writes into a cluster we own (COPIED: refcount 1) go straight to the
 * host with no lock beyond the shared io_lock.  Everything else takes
 * the metadata lock to plan an allocation, drops it for the data I/O,
 * and takes it again to link the result.  Clusters being allocated are
 * listed as in flight; other requests touching them wait, then look
 * them up again.
 *
 * Crash-ordering rules (QEMU's, which `qemu-img check` judges):
 *  1. A refcount increase reaches the disk before any L1 or L2 entry
 *     that points at the cluster: the L2 cache depends on the refcount
 *     cache (not with lazy refcounts, where the dirty bit covers it),
 *     and a new L2 table is linked into L1 only after a refcount flush.
 *  2. A new L2 table is written and synced before L1 points at it.
 *  3. Guest data, including copy-on-write data, is synced before the L2
 *     entry pointing at it is written back (the dependency flush syncs
 *     the file; an external data file is a barrier of the L2 cache).
 *  4. A pointer is removed on disk before the cluster's refcount drops
 *     (q2_free_later; see qcow2-alloc.c).
 *  5. Clusters that are compressed or shared (no COPIED flag) are never
 *     written in place: a new cluster is allocated and the old
 *     reference dropped, so a snapshot's content never changes.
 *  6. Lazy refcounts: the dirty bit is set, synced, before the first
 *     L2 update and cleared only after a full flush at close.
 */

#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"
#include "qcow2-cache.h"

/* Flush on our own once this many frees are queued, to bound memory. */
#define MAX_PENDING_FREES 65536

#define ALL_SUBCLUSTERS UINT64_C (0xffffffff)

static int
write_plain (struct q2_image *img, const void *buf, size_t n, uint64_t host)
{
  if (img->data_io == img->io)
    return q2_write_file (img, buf, n, host);
  return img->data_io->ops->pwrite (img->data_io, buf, n, host);
}

/* Encrypted images: the caller's buffer is never modified, so the
 * ciphertext goes through a per-thread buffer, a piece at a time;
 * a buffer we own (own) is encrypted in place and written at once.
 */
#define CRYPT_CHUNK (1024 * 1024)

static int
write_data (struct q2_image *img, const void *buf, size_t n, uint64_t host,
            uint64_t guest, bool own)
{
  const uint8_t *src = buf;
  uint8_t *tmp;

  if (img->crypt == NULL)
    return write_plain (img, buf, n, host);
  if (own) {
    q2_crypt_encrypt (img, (uint8_t *) buf, buf, n, host, guest);
    return write_plain (img, buf, n, host);
  }
  tmp = q2_scratch (Q2_SCRATCH_CRYPT, n < CRYPT_CHUNK ? n : CRYPT_CHUNK);
  if (tmp == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
  while (n > 0) {
    size_t len = n < CRYPT_CHUNK ? n : CRYPT_CHUNK;

    q2_crypt_encrypt (img, tmp, src, len, host, guest);
    if (write_plain (img, tmp, len, host) == -1)
      return -1;
    src += len;
    host += len;
    guest += len;
    n -= len;
  }
  return 0;
}

/* A raw external data file (autoclear bit "raw external data") must
 * read as the guest disk at all times.  Guest data always lands at its
 * own offset there; zeroes are written into it rather than flagged in
 * L2, and trims (which are advisory) are ignored.
 */
static bool
raw_data_file (const struct q2_image *img)
{
  return (img->h.autoclear & QCOW2_AUTOCLEAR_DATA_RAW) &&
    img->data_io != img->io;
}

/* Lock held.  The first write sets up the refcount state and updates
 * the header: bitmaps are flagged in use (or, if that fails, their bit
 * is dropped), the raw external data bit stays (see raw_data_file),
 * every other autoclear bit is cleared (we keep nothing unknown
 * consistent), and the dirty bit is set for lazy refcounts.
 */
static int
begin_write (struct q2_image *img)
{
  uint64_t incompat = img->h.incompat, autoclear = 0;

  if (img->write_started)
    return 0;
  /* Repair (a dirty image, or any with repair=all) before anything
   * else reads the refcounts.
   */
  if (q2_check_before_write (img) == -1)
    return -1;
  if (q2_rc_init (img) == -1 || q2_meta_init (img) == -1)
    goto fail;
  if ((img->h.autoclear & QCOW2_AUTOCLEAR_BITMAPS) &&
      q2_bitmaps_mark_in_use (img) == 0)
    autoclear |= QCOW2_AUTOCLEAR_BITMAPS;
  if (raw_data_file (img))
    autoclear |= QCOW2_AUTOCLEAR_DATA_RAW;
  img->alloc_end = (img->file_size + img->cluster_size - 1)
                   >> img->cluster_bits;
  if (img->io->fixed_size && q2_rc_used_end (img, &img->alloc_end) == -1)
    goto fail;
  img->lazy = img->h.compat & QCOW2_COMPAT_LAZY_REFCOUNTS;
  if (img->lazy)
    incompat |= QCOW2_INCOMPAT_DIRTY;
  if (img->h.version >= 3 &&
      (incompat != img->h.incompat || autoclear != img->h.autoclear)) {
    if (q2_write_header_u64 (img, QH_INCOMPAT, incompat) == -1 ||
        q2_write_header_u64 (img, QH_AUTOCLEAR, autoclear) == -1 ||
        img->io->ops->flush (img->io) == -1)
      goto fail;
    img->h.incompat = incompat;
    img->h.autoclear = autoclear;
  }
  if (!img->lazy)
    q2_cache_set_dependency (img->l2_cache, img->rc_cache);
  if (img->lazy || img->data_io != img->io)
    q2_cache_set_barrier (img->l2_cache, img->data_io);
  __atomic_store_n (&img->write_started, true, __ATOMIC_RELEASE);
  return 0;

 fail:
  q2_rc_free (img);             /* the next write starts from scratch */
  q2_meta_free (img);
  return -1;
}

int
q2_check_writable (const struct q2_image *img)
{
  if (img->readonly || img->corrupt)
    return Q2_FAIL (EROFS, "%s: the image is %s", img->filename,
                    img->corrupt ? "marked corrupt" :
                    img->snapshot ? "a snapshot export, which is read-only" :
                    "open read-only");
  if (img->check_failed)
    return Q2_FAIL (EROFS, "%s: the consistency check found errors or "
                    "corruption (see the log); writes are refused; repair "
                    "it with 'qemu-img check -r all %s', or serve it with "
                    "repair=all", img->filename, img->filename);
  if ((img->h.incompat & QCOW2_INCOMPAT_DIRTY) && !img->write_started &&
      img->repair == Q2_REPAIR_OFF)
    return Q2_FAIL (EROFS, "%s: the image is dirty (its lazy refcounts were "
                    "not written back); repair it with 'qemu-img check -r "
                    "all %s' before writing, or serve it with -r (or "
                    "with repair=auto, the default)",
                    img->filename, img->filename);
  return 0;
}

static int
start (struct q2_image *img)
{
  int r;

  if (q2_check_writable (img) == -1)
    return -1;
  if (__atomic_load_n (&img->write_started, __ATOMIC_ACQUIRE))
    return 0;
  pthread_mutex_lock (&img->lock);
  r = begin_write (img);
  pthread_mutex_unlock (&img->lock);
  return r;
}

int
q2_begin_write (struct q2_image *img)
{
  return start (img);
}

/* ---- in-flight allocations (lock held) ---- */

static bool
inflight_busy (const struct q2_image *img, uint64_t off, uint64_t len)
{
  size_t i;

  for (i = 0; i < img->n_inflight; i++)
    if (off < img->inflight[i].off + img->inflight[i].len &&
        img->inflight[i].off < off + len)
      return true;
  return false;
}

static void
wait_inflight (struct q2_image *img, uint64_t off, uint64_t len)
{
  while (inflight_busy (img, off, len))
    pthread_cond_wait (&img->inflight_cond, &img->lock);
}

static int
inflight_add (struct q2_image *img, uint64_t off, uint64_t len)
{
  return q2_range_push (img, &img->inflight, &img->n_inflight,
                        &img->cap_inflight, off, len);
}

static void
inflight_del (struct q2_image *img, uint64_t off)
{
  size_t i;

  for (i = 0; i < img->n_inflight; i++) {
    if (img->inflight[i].off == off) {
      img->inflight[i] = img->inflight[--img->n_inflight];
      break;
    }
  }
  pthread_cond_broadcast (&img->inflight_cond);
}

/* ---- L1 and L2 entries (lock held) ---- */

struct l2e {
  uint64_t e, bitmap;
};

static uint64_t
l2_index (const struct q2_image *img, uint64_t guest)
{
  return (guest >> img->cluster_bits) & ((UINT64_C (1) << img->l2_bits) - 1);
}

static int
read_entry (struct q2_image *img, uint64_t l2_off, uint64_t idx,
            struct l2e *out)
{
  uint8_t b[16];

  if (q2_cache_read (img->l2_cache, l2_off + idx * img->l2e_size, b,
                     img->l2e_size) == -1)
    return -1;
  out->e = get_be64 (b);
  out->bitmap = img->extl2 ? get_be64 (b + 8) : 0;
  return 0;
}

int
q2_write_l2_entry (struct q2_image *img, uint64_t l2_off, uint64_t idx,
                   uint64_t entry, uint64_t bitmap)
{
  uint8_t b[16];

  put_be64 (b, entry);
  put_be64 (b + 8, bitmap);
  return q2_cache_write (img->l2_cache, l2_off + idx * img->l2e_size, b,
                         img->l2e_size);
}

static int
write_l1_entry (struct q2_image *img, uint64_t idx, uint64_t entry)
{
  uint8_t b[8];

  put_be64 (b, entry);
  if (q2_write_file (img, b, 8, img->l1_offset + idx * 8) == -1)
    return -1;
  __atomic_store_n (&img->l1[idx], entry, __ATOMIC_RELEASE);
  return 0;
}

/* Build a new L2 table: zeros, or a copy of a shared one without COPIED
 * flags (its clusters stay shared with the snapshot).
 */
static int
fill_l2 (struct q2_image *img, uint8_t *buf, uint64_t old)
{
  size_t slice = q2_cache_slice_size (img->l2_cache);
  uint64_t i;

  memset (buf, 0, img->cluster_size);
  if (old == 0)
    return 0;
  for (i = 0; i < img->cluster_size; i += slice)
    if (q2_cache_read (img->l2_cache, old + i, buf + i, slice) == -1)
      return -1;
  for (i = 0; i < img->cluster_size; i += img->l2e_size)
    put_be64 (buf + i, get_be64 (buf + i) & ~QCOW_OFLAG_COPIED);
  return 0;
}

/* The L2 table for guest, allocated or copied so that we own it. */
static int
ensure_l2 (struct q2_image *img, uint64_t guest, uint64_t *l2_off)
{
  uint64_t idx = guest >> (img->cluster_bits + img->l2_bits);
  uint64_t old, rc, new, got;
  uint8_t *buf;
  int r;

  if (q2_l1_lookup (img, guest, &old) == -1)
    return -1;
  *l2_off = old;
  if (old && (img->l1[idx] & QCOW_OFLAG_COPIED))
    return 0;
  if (old) {
    if (q2_rc_get (img, old >> img->cluster_bits, &rc) == -1)
      return -1;
    if (rc == 1)                        /* the flag was merely missing */
      return write_l1_entry (img, idx, old | QCOW_OFLAG_COPIED);
  }
  buf = malloc (img->cluster_size);
  if (buf == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
  r = fill_l2 (img, buf, old);
  if (r == 0)
    r = q2_alloc_clusters (img, 1, &new, &got);
  if (r == 0) {
    q2_cache_discard (img->l2_cache, new, img->cluster_size);
    r = q2_write_file (img, buf, img->cluster_size, new);
    if (r == 0 && !img->lazy)
      r = q2_rc_flush (img);
    if (r == 0)
      r = img->io->ops->flush (img->io);
    if (r == 0)
      r = write_l1_entry (img, idx, new | QCOW_OFLAG_COPIED);
    if (r == 0)
      r = q2_meta_add (img, new, img->cluster_size);
    if (r == -1)
      q2_free_now (img, new, img->cluster_size);
    else if (old)
      r = q2_free_later (img, old, img->cluster_size);
    *l2_off = new;
  }
  free (buf);
  return r;
}

int
q2_ensure_l2 (struct q2_image *img, uint64_t guest, uint64_t *l2_off)
{
  return ensure_l2 (img, guest, l2_off);
}

int
q2_inflight_claim (struct q2_image *img, uint64_t off, uint64_t len)
{
  wait_inflight (img, off, len);
  return inflight_add (img, off, len);
}

void
q2_inflight_release (struct q2_image *img, uint64_t off)
{
  inflight_del (img, off);
}

/* ---- writing data ---- */

/* No guest data may land on metadata. */
static int
guard (struct q2_image *img, uint64_t host, uint64_t len)
{
  int r;

  if (img->data_io != img->io)
    return 0;
  pthread_mutex_lock (&img->lock);
  r = q2_check_overlap (img, host, len);
  pthread_mutex_unlock (&img->lock);
  return r;
}

/* Does this entry own a host cluster, and may we write into it? */
struct owner {
  bool has_host, compressed, copied;
  uint64_t host;
};

static int
owner_of (struct q2_image *img, const struct l2e *x, struct owner *o)
{
  bool ext_data = img->data_io != img->io;
  uint64_t rc;

  o->compressed = x->e & QCOW_OFLAG_COMPRESSED;
  o->copied = x->e & QCOW_OFLAG_COPIED;
  o->host = x->e & L2E_OFFSET_MASK;
  o->has_host = o->compressed || o->host || (ext_data && o->copied);
  if (o->has_host && !o->compressed && !o->copied && !ext_data) {
    if (q2_rc_get (img, o->host >> img->cluster_bits, &rc) == -1)
      return -1;
    o->copied = rc == 1;                /* only the flag was missing */
  }
  if (ext_data)
    o->copied = o->has_host;            /* no refcounts for data there */
  return 0;
}

static uint64_t
sub_mask (const struct q2_image *img, uint64_t from, uint64_t to)
{
  uint64_t first = from / img->subcluster_size;
  uint64_t last = (to - 1) / img->subcluster_size;

  return ((ALL_SUBCLUSTERS >> (31 - last)) >> first) << first;
}

/* The plan for one allocating write: clusters [g0, g0 + n*cs) of one L2
 * slice go to host [host, host + n*cs), with copy-on-write around the
 * new data out to multiples of unit.
 */
struct plan {
  uint64_t l2_off, g0, n, host, unit;
  bool reuse;                   /* writing into a cluster we own */
  bool in_place;                /* nothing to plan: it became writable */
  bool fresh_zeros;             /* new clusters past anything ever written,
                                   replacing content that reads as zeros:
                                   no copy-on-write needed */
  uint64_t old_alloc;           /* extended L2: allocated subclusters */
  struct owner old;             /* the replaced cluster, if n == 1 */
};

static uint64_t
descriptor (uint64_t e)
{
  return e & ~(QCOW_OFLAG_COPIED | QCOW_OFLAG_COMPRESSED);
}

/* Drop our reference to the host cluster (or compressed bytes) that
 * an entry owned, once the new entry is on disk.
 */
static int
release_later (struct q2_image *img, const struct owner *o, uint64_t desc)
{
  uint64_t host, len;

  if (!o->compressed)
    return q2_free_later (img, o->host, img->cluster_size);
  q2_cdesc_decode (img->cluster_bits, desc, &host, &len);
  return q2_free_later (img, host, len);
}

/* How many clusters after the first may share this allocation. */
static int
count_fresh (struct q2_image *img, struct plan *p, uint64_t end)
{
  uint64_t slice_entries = q2_cache_slice_size (img->l2_cache) / img->l2e_size;
  uint64_t idx = l2_index (img, p->g0);

  p->n = 1;
  while (p->g0 + p->n * img->cluster_size < end &&
         (idx + p->n) % slice_entries != 0) {
    struct l2e x;
    struct owner o;
    uint64_t g = p->g0 + p->n * img->cluster_size;

    if (inflight_busy (img, g, img->cluster_size) ||
        read_entry (img, p->l2_off, idx + p->n, &x) == -1 ||
        owner_of (img, &x, &o) == -1 || o.has_host)
      break;
    p->n++;
  }
  return 0;
}

/* Lock held: decide where the write goes and reserve it. */
static int
make_plan (struct q2_image *img, uint64_t offset, uint64_t end,
           struct plan *p, uint64_t *old_desc)
{
  struct l2e x;
  uint64_t got;

  p->g0 = offset & ~(img->cluster_size - 1);
  wait_inflight (img, p->g0, img->cluster_size);
  if (ensure_l2 (img, p->g0, &p->l2_off) == -1 ||
      read_entry (img, p->l2_off, l2_index (img, p->g0), &x) == -1 ||
      owner_of (img, &x, &p->old) == -1)
    return -1;
  *old_desc = descriptor (x.e);
  p->reuse = p->old.has_host && !p->old.compressed && p->old.copied;
  p->old_alloc = img->extl2 ? x.bitmap & ALL_SUBCLUSTERS : 0;
  /* Another request may have allocated it while we waited: then write
   * in place like any owned cluster, never copy over its data.
   */
  p->in_place = p->reuse &&
    ((x.e & QCOW_OFLAG_COPIED) || img->data_io != img->io) &&
    (img->extl2 ? (p->old_alloc >> ((offset - p->g0) / img->subcluster_size)) & 1
                : !(x.e & QCOW_OFLAG_ZERO));
  if (p->in_place)
    return 0;
  p->unit = img->extl2 && !(p->old.has_host && !p->reuse)
            ? img->subcluster_size : img->cluster_size;
  if (p->reuse) {
    p->n = 1;
    p->host = p->old.host;
  }
  else if (p->old.has_host)
    p->n = 1;
  else
    count_fresh (img, p, end);

  if (!p->reuse) {
    if (img->data_io != img->io)
      p->host = p->g0;                  /* external data: guest == host */
    else {
      if (q2_alloc_clusters (img, p->n, &p->host, &got) == -1)
        return -1;
      p->n = got;
    }
  }
  p->fresh_zeros = !p->reuse && !p->old.has_host &&
    img->data_io == img->io && img->crypt == NULL &&
    p->host >= __atomic_load_n (&img->file_size, __ATOMIC_ACQUIRE) &&
    (img->backing == NULL || p->g0 >= img->backing->size);
  if (inflight_add (img, p->g0, p->n * img->cluster_size) == -1) {
    if (!p->reuse && img->data_io == img->io)
      q2_free_now (img, p->host, p->n * img->cluster_size);
    return -1;
  }
  return 0;
}

/* Lock held: point the L2 entries at the written clusters. */
static int
link_plan (struct q2_image *img, const struct plan *p, uint64_t cow_start,
           uint64_t cow_end, uint64_t old_desc)
{
  uint64_t i, idx = l2_index (img, p->g0);

  for (i = 0; i < p->n; i++) {
    uint64_t g = p->g0 + i * img->cluster_size, bitmap = 0;
    uint64_t host = p->host + i * img->cluster_size;
    struct l2e x;

    if (img->extl2) {
      uint64_t from = cow_start > g ? cow_start - g : 0;
      uint64_t to = cow_end < g + img->cluster_size ? cow_end - g
                                                    : img->cluster_size;
      uint64_t touched = sub_mask (img, from, to);

      if (read_entry (img, p->l2_off, idx + i, &x) == -1)
        return -1;
      if (p->old.compressed)
        x.bitmap = 0;
      bitmap = ((x.bitmap & ALL_SUBCLUSTERS) | touched) |
               ((x.bitmap >> 32) & ~touched) << 32;
    }
    if (q2_write_l2_entry (img, p->l2_off, idx + i, host | QCOW_OFLAG_COPIED,
                           bitmap) == -1)
      return -1;
  }
  if (p->old.has_host && !p->reuse && img->data_io == img->io)
    return release_later (img, &p->old, old_desc);
  return 0;
}

/* Write head (old content) + data + tail (old content) in one I/O. */
static int
write_cow (struct q2_image *img, const struct plan *p, const uint8_t *buf,
           uint64_t offset, uint64_t wend, uint64_t cow_start,
           uint64_t cow_end)
{
  uint64_t head = offset - cow_start, tail = cow_end - wend;
  uint64_t host = p->host + (cow_start - p->g0);
  uint8_t *tmp;
  int r;

  if ((head == 0 && tail == 0) || p->fresh_zeros)
    return write_data (img, buf, wend - offset, host + head, offset, false);
  tmp = malloc (cow_end - cow_start);
  if (tmp == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
  r = head ? q2_read_nolock (img, tmp, head, cow_start) : 0;
  if (r == 0 && tail)
    r = q2_read_nolock (img, tmp + (wend - cow_start), tail, wend);
  if (r == 0) {
    memcpy (tmp + head, buf, wend - offset);
    r = write_data (img, tmp, cow_end - cow_start, host, cow_start, true);
  }
  free (tmp);
  return r;
}

/* Returns bytes written, or -1. */
static int64_t
write_alloc (struct q2_image *img, const uint8_t *buf, uint64_t count,
             uint64_t offset)
{
  struct plan p;
  uint64_t old_desc, wend, cow_start, cow_end;
  int r;

  pthread_mutex_lock (&img->lock);
  r = make_plan (img, offset, offset + count, &p, &old_desc);
  pthread_mutex_unlock (&img->lock);
  if (r == -1)
    return -1;
  if (p.in_place)
    return 0;                   /* the caller maps it again */

  wend = offset + count;
  if (wend > p.g0 + p.n * img->cluster_size)
    wend = p.g0 + p.n * img->cluster_size;
  cow_start = offset & ~(p.unit - 1);
  cow_end = (wend + p.unit - 1) & ~(p.unit - 1);
  if (p.reuse && img->extl2) {
    /* Allocated subclusters at the edges are written in place. */
    if ((p.old_alloc >> ((cow_start - p.g0) / p.unit)) & 1)
      cow_start = offset;
    if ((p.old_alloc >> ((cow_end - 1 - p.g0) / p.unit)) & 1)
      cow_end = wend;
  }
  /* New clusters were checked against the metadata by the allocator. */
  r = p.reuse ? guard (img, p.host + (cow_start - p.g0), cow_end - cow_start)
              : 0;
  if (r == 0)
    r = write_cow (img, &p, buf, offset, wend, cow_start, cow_end);

  pthread_mutex_lock (&img->lock);
  if (r == 0)
    r = link_plan (img, &p, cow_start, cow_end, old_desc);
  else if (!p.reuse && img->data_io == img->io)
    q2_free_now (img, p.host, p.n * img->cluster_size);
  inflight_del (img, p.g0);
  pthread_mutex_unlock (&img->lock);
  return r == -1 ? -1 : (int64_t) (wend - offset);
}

/* Returns bytes written, or -1. */
static int64_t
write_some (struct q2_image *img, const uint8_t *buf, uint64_t count,
            uint64_t offset)
{
  struct q2_run run;

  if (q2_map (img, offset, count, &run) == -1)
    return -1;
  if (run.kind == Q2_DATA && run.copied) {
    if (guard (img, run.host, run.len) == -1)
      return -1;
    if (write_data (img, buf, run.len, run.host, offset, false) == -1)
      return -1;
    return run.len;
  }
  return write_alloc (img, buf, count, offset);
}

static int write_sectors (struct q2_image *img, const uint8_t *buf,
                          uint64_t count, uint64_t offset);

/* Encrypted images: a partial sector is read, merged and written whole.
 * Such read-modify-writes are serialised, so that two requests into
 * different bytes of one sector cannot undo each other.
 */
static int
rmw_sector (struct q2_image *img, const uint8_t *buf, uint64_t n,
            uint64_t offset)
{
  uint8_t sec[Q2_SECTOR_SIZE];
  uint64_t s = offset & ~(uint64_t) (Q2_SECTOR_SIZE - 1);
  int r;

  pthread_mutex_lock (&img->rmw_lock);
  r = q2_read_nolock (img, sec, Q2_SECTOR_SIZE, s);
  if (r == 0) {
    memcpy (sec + (offset - s), buf, n);
    r = write_sectors (img, sec, Q2_SECTOR_SIZE, s);
  }
  pthread_mutex_unlock (&img->rmw_lock);
  return r;
}

static int
write_nolock (struct q2_image *img, const uint8_t *buf, uint64_t count,
              uint64_t offset)
{
  uint64_t n, mid;

  if (img->crypt == NULL || ((offset | count) % Q2_SECTOR_SIZE) == 0)
    return write_sectors (img, buf, count, offset);
  if (offset % Q2_SECTOR_SIZE) {
    n = Q2_SECTOR_SIZE - offset % Q2_SECTOR_SIZE;
    if (n > count)
      n = count;
    if (rmw_sector (img, buf, n, offset) == -1)
      return -1;
    buf += n;
    offset += n;
    count -= n;
  }
  mid = count & ~(uint64_t) (Q2_SECTOR_SIZE - 1);
  if (mid && write_sectors (img, buf, mid, offset) == -1)
    return -1;
  if (count > mid && rmw_sector (img, buf + mid, count - mid,
                                 offset + mid) == -1)
    return -1;
  return 0;
}

static int
write_sectors (struct q2_image *img, const uint8_t *buf, uint64_t count,
               uint64_t offset)
{
  unsigned stalls = 0;

  if (img->compress)
    return q2_write_compressed (img, buf, count, offset);
  while (count > 0) {
    int64_t n = write_some (img, buf, count, offset);

    if (n == -1)
      return -1;
    /* A retry after a wait makes progress next time; never spin. */
    if (n == 0 && ++stalls > 3)
      return Q2_FAIL (EIO, "%s: write at guest offset %" PRIu64 " makes "
                      "no progress", img->filename, offset);
    if (n > 0)
      stalls = 0;
    buf += n;
    offset += n;
    count -= n;
  }
  return 0;
}

/* After a request: a failure caused by damaged metadata stops all
 * further writes; a long queue of frees is flushed to bound memory.
 */
static int
finish (struct q2_image *img, int r)
{
  int saved_errno = errno;

  if (r == -1 && __atomic_load_n (&img->bad_metadata, __ATOMIC_ACQUIRE)) {
    pthread_mutex_lock (&img->lock);
    q2_mark_corrupt (img);
    pthread_mutex_unlock (&img->lock);
  }
  /* A stale count only delays the flush to a later request. */
  if (r == 0 &&
      __atomic_load_n (&img->n_pending, __ATOMIC_RELAXED) > MAX_PENDING_FREES)
    r = q2_flush (img);
  if (r == -1)
    errno = saved_errno;
  return r;
}

int
q2_write (struct q2_image *img, const void *buf, uint64_t count,
          uint64_t offset)
{
  int r;

  if (start (img) == -1)
    return -1;
  pthread_rwlock_rdlock (&img->io_lock);
  r = write_nolock (img, buf, count, offset);
  pthread_rwlock_unlock (&img->io_lock);
  return finish (img, r);
}

/* ---- zeroing and discarding whole clusters ---- */

enum rewrite { RW_ZERO, RW_ZERO_TRIM, RW_DISCARD };

/* The entry a cluster gets, and whether its host cluster is let go. */
static void
rewritten (const struct q2_image *img, enum rewrite how,
           const struct owner *o, struct l2e *x, bool *release)
{
  bool keep = how == RW_ZERO && o->has_host && o->copied && !o->compressed;
  bool zero_flag = how != RW_DISCARD || (img->h.version >= 3 && img->backing);

  *release = o->has_host && !keep && img->data_io == img->io;
  if (img->extl2) {
    x->e = keep ? (o->host | QCOW_OFLAG_COPIED) : 0;
    x->bitmap = zero_flag ? ALL_SUBCLUSTERS << 32 : 0;
  }
  else {
    x->e = (keep ? (o->host | QCOW_OFLAG_COPIED) : 0) |
           (zero_flag ? QCOW_OFLAG_ZERO : 0);
    x->bitmap = 0;
  }
}

/* Lock held: rewrite the clusters of [g, end) inside one L2 table. */
static int
rewrite_table (struct q2_image *img, uint64_t g, uint64_t end,
               enum rewrite how)
{
  uint64_t l2_off, idx;

  if (q2_l1_lookup (img, g, &l2_off) == -1)
    return -1;
  if (l2_off == 0 && (how == RW_DISCARD || img->backing == NULL))
    return 0;                   /* nothing there, and it reads as zeros */
  if (ensure_l2 (img, g, &l2_off) == -1)
    return -1;
  for (idx = l2_index (img, g); g < end; g += img->cluster_size, idx++) {
    struct l2e x, nx;
    struct owner o;
    bool release;

    if (read_entry (img, l2_off, idx, &x) == -1 ||
        owner_of (img, &x, &o) == -1)
      return -1;
    rewritten (img, how, &o, &nx, &release);
    if (nx.e == x.e && nx.bitmap == x.bitmap)
      continue;
    if (q2_write_l2_entry (img, l2_off, idx, nx.e, nx.bitmap) == -1)
      return -1;
    if (release &&
        release_later (img, &o, descriptor (x.e)) == -1)
      return -1;
  }
  return 0;
}

static int
rewrite_clusters (struct q2_image *img, uint64_t a, uint64_t b,
                  enum rewrite how)
{
  uint64_t span = UINT64_C (1) << (img->cluster_bits + img->l2_bits);
  int r = 0;

  while (a < b && r == 0) {
    uint64_t end = (a | (span - 1)) + 1 < b ? (a | (span - 1)) + 1 : b;

    pthread_mutex_lock (&img->lock);
    wait_inflight (img, a, end - a);
    r = rewrite_table (img, a, end, how);
    pthread_mutex_unlock (&img->lock);
    a = end;
  }
  return r;
}

/* Does [offset, offset+len) already read as zeros? */
static int
reads_as_zero (struct q2_image *img, uint64_t offset, uint64_t len,
               bool *zero)
{
  while (len > 0) {
    uint64_t n;
    unsigned flags;

    if (q2_block_status (img, offset, len, &n, &flags) == -1)
      return -1;
    if (!(flags & Q2_STATUS_ZERO)) {
      *zero = false;
      return 0;
    }
    offset += n;
    len -= n;
  }
  *zero = true;
  return 0;
}

static int
write_zeros (struct q2_image *img, uint64_t count, uint64_t offset)
{
  static const uint8_t zeros[65536];
  bool zero;

  if (reads_as_zero (img, offset, count, &zero) == -1)
    return -1;
  while (!zero && count > 0) {
    uint64_t n = count < sizeof zeros ? count : sizeof zeros;

    if (write_nolock (img, zeros, n, offset) == -1)
      return -1;
    offset += n;
    count -= n;
  }
  return 0;
}

int
q2_zero (struct q2_image *img, uint64_t count, uint64_t offset,
         unsigned flags)
{
  uint64_t cs = img->cluster_size, end = offset + count;
  uint64_t a = (offset + cs - 1) & ~(cs - 1), b = end & ~(cs - 1);
  bool by_flag = img->h.version >= 3 && a < b && !raw_data_file (img);
  int r = 0;

  if ((flags & Q2_ZERO_FAST) && !(by_flag && a == offset && b == end))
    return errno = ENOTSUP, -1;         /* that would write data */
  if (start (img) == -1)
    return -1;
  pthread_rwlock_rdlock (&img->io_lock);
  if (!by_flag)
    r = write_zeros (img, count, offset);
  else {
    if (offset < a)
      r = write_zeros (img, a - offset, offset);
    if (r == 0)
      r = rewrite_clusters (img, a, b, flags & Q2_ZERO_MAY_TRIM
                                       ? RW_ZERO_TRIM : RW_ZERO);
    if (r == 0 && b < end)
      r = write_zeros (img, end - b, b);
  }
  pthread_rwlock_unlock (&img->io_lock);
  return finish (img, r);
}

int
q2_trim (struct q2_image *img, uint64_t count, uint64_t offset)
{
  uint64_t cs = img->cluster_size;
  uint64_t a = (offset + cs - 1) & ~(cs - 1), b = (offset + count) & ~(cs - 1);
  int r = 0;

  if (raw_data_file (img))
    return 0;
  if (start (img) == -1)
    return -1;
  pthread_rwlock_rdlock (&img->io_lock);
  if (a < b)
    r = rewrite_clusters (img, a, b, RW_DISCARD);
  pthread_rwlock_unlock (&img->io_lock);
  return finish (img, r);
}

/* ---- flush ---- */

static int
sync_files (struct q2_image *img)
{
  if (img->io->ops->flush (img->io) == -1)
    return -1;
  if (img->data_io != img->io && img->data_io->ops->flush (img->data_io) == -1)
    return -1;
  return 0;
}

/* Write back L2 (refcounts first, by the cache dependency), sync, then
 * release the queued clusters whose pointers are now gone on disk, and
 * write back the refcounts that changed.
 */
int
q2_flush (struct q2_image *img)
{
  uint64_t upto;
  size_t n;
  int r;

  pthread_mutex_lock (&img->lock);
  if (!img->write_started) {
    pthread_mutex_unlock (&img->lock);
    return 0;
  }
  n = img->n_pending;
  upto = img->pending_done + n;
  r = q2_cache_flush (img->l2_cache);
  if (r == 0)
    r = q2_rc_flush (img);
  if (r == 0)
    r = sync_files (img);
  pthread_mutex_unlock (&img->lock);
  if (r == -1 || n == 0)
    return r;

  pthread_rwlock_wrlock (&img->io_lock);
  pthread_mutex_lock (&img->lock);
  r = q2_apply_frees (img, upto);
  if (r == 0)
    r = q2_rc_flush (img);
  pthread_mutex_unlock (&img->lock);
  pthread_rwlock_unlock (&img->io_lock);
  if (r == 0)
    r = img->io->ops->flush (img->io);
  return r;
}

/* At close: everything on disk, then the dirty bit cleared. */
int
q2_finish_writes (struct q2_image *img)
{
  if (!img->write_started)
    return 0;
  if (q2_flush (img) == -1)
    return -1;
  if (img->lazy && !img->corrupt) {
    img->h.incompat &= ~QCOW2_INCOMPAT_DIRTY;
    if (q2_write_header_u64 (img, QH_INCOMPAT, img->h.incompat) == -1 ||
        img->io->ops->flush (img->io) == -1)
      return -1;
  }
  return 0;
}
