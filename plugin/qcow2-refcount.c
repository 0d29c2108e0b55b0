/* nbdkit-qcow2: the refcount table and refcount blocks.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Refcount blocks go through the generic table cache; the refcount
 * table is small and lives in memory.  Widths of 1 to 64 bits are
 * supported; narrower ones pack LSB-first within a byte, wider ones are
 * big-endian.  Everything here runs under img->lock.
 *
 * Crash-ordering rules for new refcount structures (enforced in
 * add_blocks):
 *  - a new refcount block is written, with the refcounts of every new
 *    cluster it covers (itself included), and flushed before the
 *    refcount table entry that links it;
 *  - a grown refcount table is written and flushed before the header
 *    points to it, and the old table is freed only after that.
 */

#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"
#include "qcow2-cache.h"

/* 1 MiB of refcount slices. */
#define RC_CACHE_SLICES 256
#define RC_SLICE_SIZE 4096
/* New blocks one growth step may add (far more than it can need). */
#define MAX_NEW_BLOCKS 1024

static uint64_t
rc_max (const struct q2_image *img)
{
  return img->refcount_bits == 64 ? UINT64_MAX
                                  : (UINT64_C (1) << img->refcount_bits) - 1;
}

int
q2_rc_init (struct q2_image *img)
{
  uint64_t i, bytes = (uint64_t) img->h.reftable_clusters * img->cluster_size;
  size_t slice = img->cluster_size < RC_SLICE_SIZE ? img->cluster_size
                                                   : RC_SLICE_SIZE;

  img->refcount_bits = 1u << img->h.refcount_order;
  img->rb_bits = img->cluster_bits + 3 - img->h.refcount_order;
  img->reftable_offset = img->h.reftable_offset;
  img->reftable_entries = bytes / 8;
  img->reftable = malloc (bytes);
  if (img->reftable == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc refcount table: %m", img->filename);
  if (q2_io_pread (img->io, img->reftable, bytes, img->reftable_offset) == -1)
    return -1;
  for (i = 0; i < img->reftable_entries; i++) {
    uint64_t e = be64toh (img->reftable[i]);

    img->reftable[i] = e;
    if ((e & ~REFT_OFFSET_MASK) || (e & (img->cluster_size - 1)) ||
        e >= img->file_size || img->cluster_size > img->file_size - e)
      return Q2_FAIL (EIO, "%s: refcount table entry %" PRIu64 " at file "
                      "offset %" PRIu64 " is invalid (0x%" PRIx64 ")",
                      img->filename, i, img->reftable_offset + i * 8, e);
  }
  img->rc_cache = q2_cache_new (img->io, "refcount", slice, RC_CACHE_SLICES);
  if (img->rc_cache == NULL)
    return Q2_FAIL (ENOMEM, "%s: cannot allocate the refcount cache",
                    img->filename);
  return 0;
}

void
q2_rc_free (struct q2_image *img)
{
  q2_cache_free (img->rc_cache);
  free (img->reftable);
  img->rc_cache = NULL;
  img->reftable = NULL;
}

static uint64_t
block_of (const struct q2_image *img, uint64_t range)
{
  return range < img->reftable_entries ? img->reftable[range] : 0;
}

/* Where cluster's refcount lives inside its block. */
struct rc_pos {
  uint64_t off;                 /* file offset of the byte(s) */
  unsigned nbytes, shift;
};

static void
locate (const struct q2_image *img, uint64_t block, uint64_t cluster,
        struct rc_pos *p)
{
  uint64_t idx = cluster & ((UINT64_C (1) << img->rb_bits) - 1);
  uint64_t bit = idx * img->refcount_bits;

  p->off = block + bit / 8;
  p->nbytes = img->refcount_bits >= 8 ? img->refcount_bits / 8 : 1;
  p->shift = img->refcount_bits >= 8 ? 0 : bit % 8;
}

static uint64_t
decode (const struct q2_image *img, const uint8_t *b, const struct rc_pos *p)
{
  switch (img->refcount_bits) {
  case 64: return get_be64 (b);
  case 32: return get_be32 (b);
  case 16: return get_be16 (b);
  case 8: return b[0];
  default: return (b[0] >> p->shift) & rc_max (img);
  }
}

static void
encode (const struct q2_image *img, uint8_t *b, const struct rc_pos *p,
        uint64_t v)
{
  switch (img->refcount_bits) {
  case 64: put_be64 (b, v); break;
  case 32: put_be32 (b, v); break;
  case 16: put_be16 (b, v); break;
  case 8: b[0] = v; break;
  default:
    b[0] &= ~(rc_max (img) << p->shift);
    b[0] |= v << p->shift;
  }
}

int
q2_rc_get (struct q2_image *img, uint64_t cluster, uint64_t *rc)
{
  uint64_t block = block_of (img, cluster >> img->rb_bits);
  struct rc_pos p;
  uint8_t b[8];

  *rc = 0;
  if (block == 0)
    return 0;
  locate (img, block, cluster, &p);
  if (q2_cache_read (img->rc_cache, p.off, b, p.nbytes) == -1)
    return -1;
  *rc = decode (img, b, &p);
  return 0;
}

int
q2_rc_used_end (struct q2_image *img, uint64_t *end)
{
  uint64_t r, c, rc;

  *end = 0;
  for (r = img->reftable_entries; r-- > 0; ) {
    if (img->reftable[r] == 0)
      continue;
    for (c = (r + 1) << img->rb_bits; c-- > r << img->rb_bits; ) {
      if (q2_rc_get (img, c, &rc) == -1)
        return -1;
      if (rc) {
        *end = c + 1;
        return 0;
      }
    }
  }
  return 0;
}

/* ---- adding refcount blocks (and growing the table) ---- */

struct growth {
  uint64_t start;               /* first cluster of the new area */
  uint64_t table_clusters;      /* 0: the table does not move */
  uint64_t new_entries;
  uint64_t ranges[MAX_NEW_BLOCKS];
  size_t n;
};

static bool
listed (const struct growth *g, uint64_t r)
{
  size_t i;

  for (i = 0; i < g->n; i++)
    if (g->ranges[i] == r)
      return true;
  return false;
}

static uint64_t
area_len (const struct growth *g)
{
  return g->table_clusters + g->n;
}

/* Lay out the area: new table first, then one block per range lacking
 * one, until the area covers its own refcounts.
 */
static int
plan_growth (struct q2_image *img, uint64_t range, struct growth *g)
{
  uint64_t per_table_cluster = img->cluster_size / 8;
  bool changed = true;

  g->start = img->alloc_end;
  g->table_clusters = 0;
  g->new_entries = img->reftable_entries;
  g->ranges[0] = range;
  g->n = 1;
  while (changed) {
    uint64_t r, first = g->start >> img->rb_bits;
    uint64_t last = (g->start + area_len (g) - 1) >> img->rb_bits;
    size_t i;

    changed = false;
    for (r = first; r <= last; r++) {
      if ((r >= g->new_entries || block_of (img, r) == 0) && !listed (g, r)) {
        if (g->n == MAX_NEW_BLOCKS)
          return Q2_FAIL (EIO, "%s: refcount structures too large to grow",
                          img->filename);
        g->ranges[g->n++] = r;
        changed = true;
      }
    }
    for (i = 0; i < g->n; i++) {
      if (g->ranges[i] >= g->new_entries) {
        uint64_t want = g->ranges[i] + 1;

        if (want < 2 * img->reftable_entries)
          want = 2 * img->reftable_entries;
        want = (want + per_table_cluster - 1) / per_table_cluster
               * per_table_cluster;
        g->new_entries = want;
        g->table_clusters = want / per_table_cluster;
        changed = true;
      }
    }
  }
  if ((g->new_entries * 8) > QCOW2_MAX_REFTABLE_BYTES)
    return Q2_FAIL (ENOSPC, "%s: the refcount table would exceed its "
                    "maximum size", img->filename);
  return 0;
}

/* Every cluster of the new area gets refcount 1: in the new block of
 * its range, or through the cache where its range has a block already.
 */
static int
write_new_blocks (struct q2_image *img, const struct growth *g)
{
  uint64_t first_block = g->start + g->table_clusters, x;
  uint8_t *buf = malloc (img->cluster_size);
  size_t i;
  int r = 0;

  if (buf == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
  for (i = 0; i < g->n && r == 0; i++) {
    uint64_t block = (first_block + i) << img->cluster_bits;

    memset (buf, 0, img->cluster_size);
    for (x = g->start; x < g->start + area_len (g); x++) {
      struct rc_pos p;

      if (x >> img->rb_bits != g->ranges[i])
        continue;
      locate (img, 0, x, &p);
      encode (img, buf + p.off, &p, 1);
    }
    q2_cache_discard (img->rc_cache, block, img->cluster_size);
    q2_cache_discard (img->l2_cache, block, img->cluster_size);
    r = q2_write_file (img, buf, img->cluster_size, block);
  }
  free (buf);
  for (x = g->start; x < g->start + area_len (g) && r == 0; x++)
    if (!listed (g, x >> img->rb_bits))
      r = q2_rc_add (img, x, 1);
  return r;
}

static int
write_header_reftable (struct q2_image *img, uint64_t off, uint32_t clusters)
{
  uint8_t b[12];

  put_be64 (b, off);
  put_be32 (b + 8, clusters);
  return q2_write_file (img, b, sizeof b, QH_REFTABLE_OFFSET);
}

/* Link the new blocks: into a new table (then switch the header to
 * it), or entry by entry into the current one.
 */
static int
link_blocks (struct q2_image *img, const struct growth *g)
{
  uint64_t first_block = g->start + g->table_clusters;
  uint64_t old_off = img->reftable_offset, old_entries = img->reftable_entries;
  size_t i;

  if (g->table_clusters == 0) {
    for (i = 0; i < g->n; i++) {
      uint8_t b[8];
      uint64_t block = (first_block + i) << img->cluster_bits;

      put_be64 (b, block);
      if (q2_write_file (img, b, 8, old_off + g->ranges[i] * 8) == -1)
        return -1;
      img->reftable[g->ranges[i]] = block;
    }
    return 0;
  }

  uint64_t *nt = calloc (g->new_entries, 8), *disk;
  uint64_t new_off = g->start << img->cluster_bits;
  int r;

  disk = calloc (g->new_entries, 8);
  if (nt == NULL || disk == NULL) {
    free (nt);
    free (disk);
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
  }
  memcpy (nt, img->reftable, old_entries * 8);
  for (i = 0; i < g->n; i++)
    nt[g->ranges[i]] = (first_block + i) << img->cluster_bits;
  for (i = 0; i < g->new_entries; i++)
    disk[i] = htobe64 (nt[i]);
  r = q2_write_file (img, disk, g->new_entries * 8, new_off);
  free (disk);
  if (r == 0)
    r = img->io->ops->flush (img->io);
  if (r == 0)
    r = write_header_reftable (img, new_off, g->table_clusters);
  if (r == 0)
    r = img->io->ops->flush (img->io);
  if (r == -1) {
    free (nt);
    return -1;
  }
  free (img->reftable);
  img->reftable = nt;
  img->reftable_entries = g->new_entries;
  img->reftable_offset = new_off;
  q2_meta_remove (img, old_off);
  q2_meta_add (img, new_off, g->table_clusters << img->cluster_bits);
  /* The header no longer points at the old table: free it now. */
  return q2_free_now (img, old_off, old_entries * 8);
}

int
q2_rc_add_block (struct q2_image *img, uint64_t range)
{
  struct growth *g = malloc (sizeof *g);
  size_t i;
  int r;

  if (g == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
  r = plan_growth (img, range, g);
  if (r == 0) {
    img->alloc_end = g->start + area_len (g);
    r = write_new_blocks (img, g);
  }
  if (r == 0)
    r = q2_rc_flush (img);
  if (r == 0)
    r = img->io->ops->flush (img->io);
  if (r == 0)
    r = link_blocks (img, g);
  for (i = 0; i < g->n && r == 0; i++)
    q2_meta_add (img, (g->start + g->table_clusters + i) << img->cluster_bits,
                 img->cluster_size);
  free (g);
  return r;
}

int
q2_rc_add (struct q2_image *img, uint64_t cluster, int delta)
{
  uint64_t range = cluster >> img->rb_bits, block, v;
  struct rc_pos p;
  uint8_t b[8];

  block = block_of (img, range);
  if (block == 0 && delta > 0) {
    if (q2_rc_add_block (img, range) == -1)
      return -1;
    block = block_of (img, range);
  }
  if (block == 0)
    return q2_mark_corrupt (img), Q2_FAIL (EIO, "%s: refcount of cluster at 0x%" PRIx64 " would "
                    "drop below zero (no refcount block)", img->filename,
                    cluster << img->cluster_bits);
  locate (img, block, cluster, &p);
  if (q2_cache_read (img->rc_cache, p.off, b, p.nbytes) == -1)
    return -1;
  v = decode (img, b, &p);
  if ((delta < 0 && v < (uint64_t) -delta) ||
      (delta > 0 && rc_max (img) - v < (uint64_t) delta))
    return q2_mark_corrupt (img), Q2_FAIL (EIO, "%s: refcount of cluster at 0x%" PRIx64 " is %"
                    PRIu64 " and cannot change by %d", img->filename,
                    cluster << img->cluster_bits, v, delta);
  v += delta;
  encode (img, b, &p, v);
  if (q2_cache_write (img->rc_cache, p.off, b, p.nbytes) == -1)
    return -1;
  if (v == 0 && cluster < img->free_hint)
    img->free_hint = cluster;
  if (v > 0 && cluster >= img->alloc_end)
    img->alloc_end = cluster + 1;
  return 0;
}

int
q2_rc_flush (struct q2_image *img)
{
  return img->rc_cache ? q2_cache_flush (img->rc_cache) : 0;
}

/* Drop one reference to each cluster of [off, off+len) now. */
int
q2_free_now (struct q2_image *img, uint64_t off, uint64_t len)
{
  uint64_t c, rc;

  for (c = off >> img->cluster_bits;
       c <= (off + len - 1) >> img->cluster_bits; c++) {
    if (q2_rc_add (img, c, -1) == -1)
      return -1;
    if (q2_rc_get (img, c, &rc) == 0 && rc == 0) {
      q2_meta_remove (img, c << img->cluster_bits);
      /* Compressed writes pack into this cluster no more. */
      if (img->cpack_end && c == (img->cpack_end >> img->cluster_bits) - 1)
        img->cpack_end = img->cpack_off = 0;
    }
  }
  return 0;
}
