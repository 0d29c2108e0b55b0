/* nbdkit-qcow2: consistency check and refcount rebuild.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * The check walks everything that holds a reference to a cluster of
 * the image file: the header cluster, the active L1 table and every
 * snapshot's, the L2 tables they point to and the data (or compressed)
 * clusters those point to, the snapshot table, the LUKS area, the
 * bitmap directory with its bitmap tables and their data clusters, and
 * the refcount table with its blocks.  It counts the references per
 * cluster in one array sized to the file (2 bytes a cluster, saturating
 * at the refcount width's maximum), then compares them with the
 * refcounts on disk: a refcount above its references is a leak, below
 * them an error; the active L1 and L2 entries must carry COPIED exactly
 * when the cluster's refcount is 1.  With an external data file, data
 * clusters are not in the image file and are not counted.
 *
 * A reference outside the file, an unaligned table or data offset, or
 * two structures claiming one cluster (metadata used as data, say) is
 * real metadata corruption: the check reports it and refuses to
 * repair, because no refcount can make such an image safe to write.
 * Damage confined to the refcount structures (an invalid refcount table
 * entry, two entries naming one block, a referenced cluster with no
 * block) is repaired by writing fresh ones.  A refcount block on other
 * metadata or data is corruption: which pointer is wrong is unknown.
 *
 * Repair order, so that a crash at any point leaves at most leaks, or
 * (for lazy-refcount images, still dirty) what a second repair fixes:
 *  - in place: raise the refcounts that are too low, flush; clear
 *    COPIED where the cluster is shared, flush; lower the refcounts that
 *    are too high, flush; set the COPIED flags that are missing, flush;
 *  - fresh structures: write a new refcount table and blocks past the
 *    end of the file, flush, switch the header to them with one write,
 *    flush, then fix the COPIED flags and flush.
 * Before the first of these writes the dirty bit is set (v3), so that
 * an interrupted repair is redone by the next read-write open, ours or
 * QEMU's; the caller clears it at the end (q2_check_before_write).
 */

#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"
#include "qcow2-cache.h"

/* What claims a cluster. */
enum { K_NONE, K_DATA, K_L2, K_META, K_RC };

/* Log at most this many individual findings. */
#define MAX_REPORTED 10
/* Log progress for files with more clusters than this. */
#define PROGRESS_MIN_CLUSTERS (UINT64_C (1) << 20)

struct chk {
  struct q2_image *img;
  const char *fn;
  unsigned cb;                  /* cluster bits */
  uint64_t cs;                  /* cluster size */
  uint64_t nclusters;           /* of the file */
  uint16_t *refs;
  uint8_t *kind;
  uint64_t limit;               /* counts saturate here */
  unsigned order;               /* refcount order */
  unsigned rb_bits;             /* log2 of refcounts per block */
  uint64_t *reftable;           /* host-endian, 0 where unusable */
  uint64_t rt_entries;
  uint8_t *blk;                 /* one refcount block */
  uint64_t blk_range;           /* which range blk holds, or UINT64_MAX */
  uint8_t *l2buf;
  bool ext_data;
  bool corrupt;                 /* real metadata corruption */
  bool rc_damaged;              /* the refcount structures are damaged */
  bool progress;
  struct q2_check_result *res;
};

static uint64_t
rc_max_of (unsigned order)
{
  return order == 6 ? UINT64_MAX : (UINT64_C (1) << (1u << order)) - 1;
}

/* The refcount of entry idx of a refcount block. */
static uint64_t
rc_decode (const uint8_t *b, unsigned order, uint64_t idx)
{
  unsigned bits = 1u << order;

  switch (bits) {
  case 64: return get_be64 (b + idx * 8);
  case 32: return get_be32 (b + idx * 4);
  case 16: return get_be16 (b + idx * 2);
  case 8: return b[idx];
  default:
    return (b[idx * bits / 8] >> (idx * bits % 8)) & rc_max_of (order);
  }
}

static void
rc_encode (uint8_t *b, unsigned order, uint64_t idx, uint64_t v)
{
  unsigned bits = 1u << order;
  uint8_t *p;

  switch (bits) {
  case 64: put_be64 (b + idx * 8, v); break;
  case 32: put_be32 (b + idx * 4, (uint32_t) v); break;
  case 16: put_be16 (b + idx * 2, (uint16_t) v); break;
  case 8: b[idx] = v; break;
  default:
    p = &b[idx * bits / 8];
    *p &= ~(rc_max_of (order) << (idx * bits % 8));
    *p |= v << (idx * bits % 8);
  }
}

static int
corrupt (struct chk *ck, const char *what, uint64_t off)
{
  if (!ck->corrupt)
    q2_error ("%s: %s (file offset 0x%" PRIx64 "); the metadata is corrupt "
              "and refcounts cannot be rebuilt", ck->fn, what, off);
  ck->corrupt = true;
  return -1;
}

/* Count one reference to every cluster of [off, off+len). */
static int
ref (struct chk *ck, uint64_t off, uint64_t len, int kind, const char *what)
{
  uint64_t c, last;

  if (len == 0)
    return 0;
  if (off >= ck->nclusters << ck->cb ||
      len > (ck->nclusters << ck->cb) - off) {
    if (kind == K_RC) {
      ck->rc_damaged = true;
      return 0;
    }
    return corrupt (ck, what, off);
  }
  last = (off + len - 1) >> ck->cb;
  for (c = off >> ck->cb; c <= last; c++) {
    int k = ck->kind[c];

    if (k != K_NONE &&
        (k != kind || kind == K_META || kind == K_RC)) {
      if (kind == K_RC && k == K_RC) {
        /* Two refcount structures in one cluster: drop the second. */
        ck->rc_damaged = true;
        continue;
      }
      else {
        char msg[160];

        snprintf (msg, sizeof msg, "%s overlaps other metadata or data at "
                  "cluster 0x%" PRIx64, what, c << ck->cb);
        return corrupt (ck, msg, off);
      }
    }
    ck->kind[c] = kind;
    if (ck->refs[c] < ck->limit)
      ck->refs[c]++;
    else
      return corrupt (ck, "too many references to one cluster", c << ck->cb);
  }
  return 0;
}

static int
walk_l2 (struct chk *ck, uint64_t l2_off)
{
  struct q2_image *img = ck->img;
  uint64_t j, n = ck->cs / img->l2e_size;

  if (q2_io_pread (img->io, ck->l2buf, ck->cs, l2_off) == -1)
    return -1;
  for (j = 0; j < n; j++) {
    uint64_t e = get_be64 (ck->l2buf + j * img->l2e_size);
    uint64_t host, len;

    if (e & QCOW_OFLAG_COMPRESSED) {
      if (ck->ext_data)
        return corrupt (ck, "compressed cluster in an image with an "
                        "external data file", l2_off + j * img->l2e_size);
      q2_cdesc_decode (ck->cb, e & ~(QCOW_OFLAG_COPIED |
                                     QCOW_OFLAG_COMPRESSED), &host, &len);
      /* The sector count is rounded up: the last compressed cluster
       * may claim a few bytes past the end of the file.
       */
      if (host < img->file_size && len > img->file_size - host)
        len = img->file_size - host;
      if (ref (ck, host, len, K_DATA, "compressed cluster") == -1)
        return -1;
      continue;
    }
    host = e & L2E_OFFSET_MASK;
    if (host == 0 || ck->ext_data)
      continue;
    if (host & (ck->cs - 1))
      return corrupt (ck, "L2 entry with an unaligned host offset",
                      l2_off + j * img->l2e_size);
    if (ref (ck, host, ck->cs, K_DATA, "data cluster") == -1)
      return -1;
  }
  return 0;
}

static int
walk_l1 (struct chk *ck, uint64_t l1_off, uint32_t l1_size, bool active)
{
  struct q2_image *img = ck->img;
  uint64_t *l1;
  uint32_t i, step = l1_size / 10 ? l1_size / 10 : 1;
  int r = 0;

  if (l1_size == 0)
    return 0;
  if (l1_off & (ck->cs - 1))
    return corrupt (ck, "unaligned L1 table", l1_off);
  if (ref (ck, l1_off, (uint64_t) l1_size * 8, K_META, "L1 table") == -1 ||
      q2_load_l1 (img, l1_off, l1_size, &l1) == -1)
    return -1;
  for (i = 0; i < l1_size && r == 0; i++) {
    uint64_t l2 = l1[i] & L1E_OFFSET_MASK;

    if (ck->progress && active && i % step == 0 && i)
      q2_debug ("%s: check: %u%% of the active L1 table", ck->fn,
                (unsigned) ((uint64_t) i * 100 / l1_size));
    if (l2 == 0)
      continue;
    if (l2 & (ck->cs - 1))
      r = corrupt (ck, "L1 entry with an unaligned L2 offset",
                   l1_off + (uint64_t) i * 8);
    else if ((r = ref (ck, l2, ck->cs, K_L2, "L2 table")) == 0)
      r = walk_l2 (ck, l2);
  }
  free (l1);
  return r;
}

/* The bitmap directory, each bitmap's table and its data clusters. */
static int
walk_bitmaps (struct chk *ck)
{
  struct q2_image *img = ck->img;
  uint64_t size = img->h.bitmap_dir_size, off = img->h.bitmap_dir_offset;
  uint64_t pos = 0;
  uint8_t *dir;
  uint32_t i;
  int r = 0;

  if (!(img->h.autoclear & QCOW2_AUTOCLEAR_BITMAPS) ||
      img->h.nb_bitmaps == 0)
    return 0;                   /* ignored, as QEMU does */
  if (size == 0 || size > QBM_MAX_DIR_BYTES || (off & (ck->cs - 1)))
    return corrupt (ck, "invalid bitmap directory", off);
  if (ref (ck, off, size, K_META, "bitmap directory") == -1)
    return -1;
  dir = malloc (size);
  if (dir == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", ck->fn);
  if (q2_io_pread (img->io, dir, size, off) == -1) {
    free (dir);
    return -1;
  }
  for (i = 0; i < img->h.nb_bitmaps && r == 0; i++) {
    uint64_t len, toff, j;
    uint32_t tsize;
    uint64_t *table;

    if (size - pos < QBM_FIXED_SIZE) {
      r = corrupt (ck, "bitmap directory too short", off);
      break;
    }
    toff = get_be64 (dir + pos);
    tsize = get_be32 (dir + pos + 8);
    len = QBM_FIXED_SIZE + (uint64_t) get_be32 (dir + pos + QBM_EXTRA_SIZE)
          + get_be16 (dir + pos + QBM_NAME_SIZE);
    len = (len + 7) & ~UINT64_C (7);
    if (len > size - pos) {
      r = corrupt (ck, "bitmap directory entry runs past the directory",
                   off + pos);
      break;
    }
    pos += len;
    if (tsize == 0)
      continue;
    if ((toff & (ck->cs - 1)) || (uint64_t) tsize * 8 > QCOW2_MAX_L1_BYTES) {
      r = corrupt (ck, "invalid bitmap table", off + pos - len);
      break;
    }
    if ((r = ref (ck, toff, (uint64_t) tsize * 8, K_META, "bitmap table")))
      break;
    table = malloc ((uint64_t) tsize * 8);
    if (table == NULL) {
      r = Q2_FAIL (ENOMEM, "%s: malloc: %m", ck->fn);
      break;
    }
    r = q2_io_pread (img->io, table, (uint64_t) tsize * 8, toff);
    for (j = 0; j < tsize && r == 0; j++) {
      uint64_t d = be64toh (table[j]) & L2E_OFFSET_MASK;

      if (d == 0)
        continue;
      if (d & (ck->cs - 1))
        r = corrupt (ck, "unaligned bitmap data cluster", toff + j * 8);
      else
        r = ref (ck, d, ck->cs, K_META, "bitmap data cluster");
    }
    free (table);
  }
  free (dir);
  return r;
}

/* The refcount table and its blocks; invalid entries are dropped. */
static int
walk_refcounts (struct chk *ck)
{
  struct q2_image *img = ck->img;
  uint64_t off = img->h.reftable_offset, i;
  uint64_t bytes = (uint64_t) img->h.reftable_clusters * ck->cs;

  if ((off & (ck->cs - 1)) || bytes == 0 ||
      bytes > QCOW2_MAX_REFTABLE_BYTES ||
      off >= ck->nclusters << ck->cb ||
      bytes > (ck->nclusters << ck->cb) - off) {
    ck->rc_damaged = true;
    return 0;
  }
  ck->rt_entries = bytes / 8;
  ck->reftable = malloc (bytes);
  if (ck->reftable == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", ck->fn);
  if (q2_io_pread (img->io, ck->reftable, bytes, off) == -1)
    return -1;
  if (ref (ck, off, bytes, K_RC, "refcount table") == -1)
    return -1;
  for (i = 0; i < ck->rt_entries; i++) {
    uint64_t e = be64toh (ck->reftable[i]);

    ck->reftable[i] = e;
    if (e == 0)
      continue;
    if ((e & ~REFT_OFFSET_MASK) || (e & (ck->cs - 1)) ||
        e >= ck->nclusters << ck->cb || ck->kind[e >> ck->cb] == K_RC) {
      q2_debug ("%s: check: refcount table entry %" PRIu64 " (0x%" PRIx64
                ") is unusable", ck->fn, i, e);
      ck->reftable[i] = 0;
      ck->rc_damaged = true;
      ck->res->errors++;        /* as qemu-img check counts it */
      continue;
    }
    /* A block on other metadata or data: which of the two pointers is
     * wrong cannot be told, so this is corruption, not repaired.
     */
    if (ref (ck, e, ck->cs, K_RC, "refcount block") == -1)
      return -1;
  }
  return 0;
}

/* The refcount on disk (0 where no usable block covers the cluster). */
static int
disk_rc (struct chk *ck, uint64_t c, uint64_t *v)
{
  uint64_t range = c >> ck->rb_bits;

  *v = 0;
  if (ck->reftable == NULL || range >= ck->rt_entries ||
      ck->reftable[range] == 0)
    return 0;
  if (ck->blk_range != range) {
    if (q2_io_pread (ck->img->io, ck->blk, ck->cs, ck->reftable[range]) == -1)
      return -1;
    ck->blk_range = range;
  }
  *v = rc_decode (ck->blk, ck->order,
                  c & ((UINT64_C (1) << ck->rb_bits) - 1));
  return 0;
}

static int
compare (struct chk *ck)
{
  struct q2_check_result *res = ck->res;
  uint64_t c, v, covered = ck->rt_entries << ck->rb_bits;
  uint64_t end = covered > ck->nclusters ? covered : ck->nclusters;

  for (c = 0; c < end; c++) {
    uint64_t want = c < ck->nclusters ? ck->refs[c] : 0;
    uint64_t range = c >> ck->rb_bits;

    /* Past the end of the file, only blocks that exist matter. */
    if (c >= ck->nclusters &&
        (range >= ck->rt_entries || ck->reftable[range] == 0)) {
      c = ((range + 1) << ck->rb_bits) - 1;
      continue;
    }
    if (disk_rc (ck, c, &v) == -1)
      return -1;
    if (v == want)
      continue;
    if (c >= ck->nclusters) {
      /* Past the end of the file: qemu-img check does not look there,
       * but our allocator would hand such a cluster out.
       */
      res->leaks_past_end++;
      continue;
    }
    if (v > want) {
      if (res->leaks++ < MAX_REPORTED)
        q2_debug ("%s: check: leaked cluster 0x%" PRIx64 " refcount=%"
                  PRIu64 " references=%" PRIu64, ck->fn, c << ck->cb, v,
                  want);
    }
    else if (res->errors++ < MAX_REPORTED)
      q2_debug ("%s: check: cluster 0x%" PRIx64 " refcount=%" PRIu64
                " references=%" PRIu64, ck->fn, c << ck->cb, v, want);
  }
  return 0;
}

/* ---- COPIED flags of the active layer ---- */

enum copied_pass { CP_COUNT, CP_CLEAR, CP_SET };

/* What the entry's COPIED flag should be: counting (as qemu-img check
 * does), by the refcount on disk; repairing, by the final refcount.
 */
static int
want_copied (struct chk *ck, enum copied_pass pass, uint64_t host,
             bool *want)
{
  uint64_t v;

  if (pass != CP_COUNT) {
    *want = ck->refs[host >> ck->cb] == 1;
    return 0;
  }
  if (disk_rc (ck, host >> ck->cb, &v) == -1)
    return -1;
  *want = v == 1;
  return 0;
}

static int
write_l1_entry (struct chk *ck, uint32_t i, uint64_t e)
{
  struct q2_image *img = ck->img;
  uint8_t b[8];

  put_be64 (b, e);
  if (q2_write_file (img, b, 8, img->h.l1_offset + (uint64_t) i * 8) == -1)
    return -1;
  if (img->l1_offset == img->h.l1_offset && i < img->l1_size)
    __atomic_store_n (&img->l1[i], e, __ATOMIC_RELEASE);
  return 0;
}

/* Does entry e need a change in this pass?  Sets *ne. */
static bool
fix_flag (enum copied_pass pass, uint64_t e, bool want, uint64_t *ne)
{
  bool has = e & QCOW_OFLAG_COPIED;

  if (has == want)
    return false;
  if (pass == CP_CLEAR && has) {
    *ne = e & ~QCOW_OFLAG_COPIED;
    return true;
  }
  if (pass == CP_SET && !has) {
    *ne = e | QCOW_OFLAG_COPIED;
    return true;
  }
  return pass == CP_COUNT;
}

/* Count (CP_COUNT) or fix the active layer's COPIED flags.  Fixes of
 * L2 entries go through the L2 cache, which readers share.
 */
static int
copied_flags (struct chk *ck, enum copied_pass pass, uint64_t *count)
{
  struct q2_image *img = ck->img;
  uint64_t *l1;
  uint32_t i;
  int r = 0;

  if (img->h.l1_size == 0)
    return 0;
  if (q2_load_l1 (img, img->h.l1_offset, img->h.l1_size, &l1) == -1)
    return -1;
  for (i = 0; i < img->h.l1_size && r == 0; i++) {
    uint64_t l2 = l1[i] & L1E_OFFSET_MASK, j, ne;
    uint64_t n = ck->cs / img->l2e_size;
    bool want;

    if (l2 == 0)
      continue;
    if ((r = want_copied (ck, pass, l2, &want)) == -1)
      break;
    if (fix_flag (pass, l1[i], want, &ne)) {
      ++*count;
      if (pass != CP_COUNT && (r = write_l1_entry (ck, i, ne)) == -1)
        break;
    }
    if ((r = q2_io_pread (img->io, ck->l2buf, ck->cs, l2)) == -1)
      break;
    for (j = 0; j < n && r == 0; j++) {
      uint64_t e = get_be64 (ck->l2buf + j * img->l2e_size);
      uint64_t host = e & L2E_OFFSET_MASK;

      if (e & QCOW_OFLAG_COMPRESSED)
        want = false;
      else if (host == 0 || ck->ext_data)
        continue;
      else if ((r = want_copied (ck, pass, host, &want)) == -1)
        break;
      if (!fix_flag (pass, e, want, &ne))
        continue;
      ++*count;
      if (pass != CP_COUNT) {
        uint64_t bm = img->extl2
                      ? get_be64 (ck->l2buf + j * img->l2e_size + 8) : 0;

        r = q2_write_l2_entry (img, l2, j, ne, bm);
      }
    }
  }
  free (l1);
  if (r == 0 && pass != CP_COUNT && *count)
    r = q2_cache_flush (img->l2_cache);
  if (r == 0 && pass != CP_COUNT)
    r = img->io->ops->flush (img->io);
  return r;
}

/* ---- repair in place ---- */

/* Set the refcounts that differ: raising ones (up) or lowering ones. */
static int
fix_in_place (struct chk *ck, bool up, uint64_t *fixed)
{
  struct q2_image *img = ck->img;
  uint64_t per = UINT64_C (1) << ck->rb_bits, range;

  for (range = 0; range < ck->rt_entries; range++) {
    uint64_t block = ck->reftable[range], i;
    bool changed = false;

    if (block == 0)
      continue;
    if (q2_io_pread (img->io, ck->blk, ck->cs, block) == -1)
      return -1;
    ck->blk_range = range;
    for (i = 0; i < per; i++) {
      uint64_t c = range * per + i;
      uint64_t want = c < ck->nclusters ? ck->refs[c] : 0;
      uint64_t v = rc_decode (ck->blk, ck->order, i);

      if (v == want || (up && v > want) || (!up && v < want))
        continue;
      rc_encode (ck->blk, ck->order, i, want);
      changed = true;
      ++*fixed;
    }
    if (changed && q2_write_file (img, ck->blk, ck->cs, block) == -1)
      return -1;
  }
  return img->io->ops->flush (img->io);
}

/* Can the blocks we have hold every refcount we need? */
static bool
blocks_suffice (struct chk *ck)
{
  uint64_t c;

  if (ck->rc_damaged || ck->reftable == NULL)
    return false;
  for (c = 0; c < ck->nclusters; c++) {
    uint64_t range = c >> ck->rb_bits;

    if (ck->refs[c] &&
        (range >= ck->rt_entries || ck->reftable[range] == 0))
      return false;
  }
  return true;
}

/* ---- repair with fresh refcount structures ---- */

static int
rebuild (struct chk *ck)
{
  struct q2_image *img = ck->img;
  uint64_t per_block = UINT64_C (1) << ck->rb_bits, per_tc = ck->cs / 8;
  uint64_t start = ck->nclusters, nb = 0, nt = 0, total, b, c;
  uint64_t *table;
  uint8_t hdr[12];
  int r = 0;

  for (;;) {
    uint64_t b2, t2;

    total = start + nt + nb;
    b2 = (total + per_block - 1) / per_block;
    t2 = (b2 + per_tc - 1) / per_tc;
    if (b2 == nb && t2 == nt)
      break;
    nb = b2;
    nt = t2;
  }
  if (nt * ck->cs > QCOW2_MAX_REFTABLE_BYTES || nt > UINT32_MAX)
    return Q2_FAIL (ENOSPC, "%s: a new refcount table would be too large",
                    ck->fn);
  q2_error ("%s: warning: the refcount structures are damaged; writing new "
            "ones (%" PRIu64 " table clusters, %" PRIu64 " blocks) at file "
            "offset 0x%" PRIx64, ck->fn, nt, nb, start << ck->cb);
  table = calloc (nt * per_tc, 8);
  if (table == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", ck->fn);
  for (b = 0; b < nb && r == 0; b++) {
    uint64_t where = (start + nt + b) << ck->cb;

    memset (ck->blk, 0, ck->cs);
    for (c = b * per_block; c < (b + 1) * per_block && c < total; c++) {
      uint64_t v = c >= start ? 1
                   : c < ck->nclusters && ck->kind[c] != K_RC ? ck->refs[c]
                   : 0;

      if (v)
        rc_encode (ck->blk, ck->order, c - b * per_block, v);
    }
    table[b] = htobe64 (where);
    r = q2_write_file (img, ck->blk, ck->cs, where);
  }
  if (r == 0)
    r = q2_write_file (img, table, nt * ck->cs, start << ck->cb);
  free (table);
  if (r == 0)
    r = img->io->ops->flush (img->io);
  if (r == -1)
    return -1;
  /* The switch: one write of the table's offset and size. */
  put_be64 (hdr, start << ck->cb);
  put_be32 (hdr + 8, nt);
  if (q2_write_file (img, hdr, sizeof hdr, QH_REFTABLE_OFFSET) == -1 ||
      img->io->ops->flush (img->io) == -1)
    return -1;
  img->h.reftable_offset = start << ck->cb;
  img->h.reftable_clusters = nt;
  /* From now on the refcounts are exactly the references: the old
   * structures count as nothing.
   */
  for (c = 0; c < ck->nclusters; c++)
    if (ck->kind[c] == K_RC)
      ck->refs[c] = 0;
  return 0;
}

/* ---- entry points ---- */

static int
mark_dirty (struct q2_image *img)
{
  uint8_t b[8];

  if (img->h.version < 3 || (img->h.incompat & QCOW2_INCOMPAT_DIRTY))
    return 0;
  put_be64 (b, img->h.incompat | QCOW2_INCOMPAT_DIRTY);
  if (q2_write_file (img, b, 8, QH_INCOMPAT) == -1 ||
      img->io->ops->flush (img->io) == -1)
    return -1;
  img->h.incompat |= QCOW2_INCOMPAT_DIRTY;
  return 0;
}

static void
chk_free (struct chk *ck)
{
  free (ck->refs);
  free (ck->kind);
  free (ck->reftable);
  free (ck->blk);
  free (ck->l2buf);
}

static int
count_all (struct chk *ck)
{
  struct q2_image *img = ck->img;
  uint32_t i;

  if (ref (ck, 0, ck->cs, K_META, "header") == -1 ||
      walk_l1 (ck, img->h.l1_offset, img->h.l1_size, true) == -1)
    return -1;
  if (img->h.nb_snapshots &&
      ref (ck, img->h.snapshots_offset, img->snap_table_len, K_META,
           "snapshot table") == -1)
    return -1;
  for (i = 0; i < img->nb_snaps; i++)
    if (walk_l1 (ck, img->snaps[i].l1_offset, img->snaps[i].l1_size,
                 false) == -1)
      return -1;
  if (img->h.crypt_method == QCOW2_CRYPT_LUKS && img->h.crypto_length) {
    if (img->h.crypto_offset & (ck->cs - 1))
      return corrupt (ck, "unaligned encryption header",
                      img->h.crypto_offset);
    if (ref (ck, img->h.crypto_offset, img->h.crypto_length, K_META,
             "encryption header") == -1)
      return -1;
  }
  if (walk_bitmaps (ck) == -1)
    return -1;
  /* Last, so that an overlap with them is blamed on them. */
  return walk_refcounts (ck);
}

int
q2_check (struct q2_image *img, bool repair, struct q2_check_result *res)
{
  struct chk ck = { .img = img, .fn = img->filename };
  uint64_t copied = 0;
  int r = -1;

  memset (res, 0, sizeof *res);
  ck.res = res;
  ck.cb = img->cluster_bits;
  ck.cs = img->cluster_size;
  ck.nclusters = (img->file_size + ck.cs - 1) >> ck.cb;
  ck.order = img->h.refcount_order;
  ck.rb_bits = ck.cb + 3 - ck.order;
  ck.limit = rc_max_of (ck.order) < UINT16_MAX ? rc_max_of (ck.order)
                                               : UINT16_MAX;
  ck.blk_range = UINT64_MAX;
  ck.ext_data = img->h.incompat & QCOW2_INCOMPAT_DATA_FILE;
  ck.progress = ck.nclusters > PROGRESS_MIN_CLUSTERS;
  ck.refs = calloc (ck.nclusters ? ck.nclusters : 1, sizeof *ck.refs);
  ck.kind = calloc (ck.nclusters ? ck.nclusters : 1, 1);
  ck.blk = malloc (ck.cs);
  ck.l2buf = malloc (ck.cs);
  if (ck.refs == NULL || ck.kind == NULL || ck.blk == NULL ||
      ck.l2buf == NULL) {
    (void) Q2_FAIL (ENOMEM, "%s: cannot allocate the check's counts for %" PRIu64
             " clusters: %m", ck.fn, ck.nclusters);
    goto out;
  }
  if (ck.progress)
    q2_debug ("%s: check: counting references to %" PRIu64 " clusters",
              ck.fn, ck.nclusters);
  if (count_all (&ck) == -1 || compare (&ck) == -1 ||
      copied_flags (&ck, CP_COUNT, &res->copied) == -1) {
    if (ck.corrupt) {
      res->corrupt = true;
      errno = EIO;
    }
    goto out;
  }
  res->rc_damaged = ck.rc_damaged;
  q2_debug ("%s: check: %" PRIu64 " leaked clusters, %" PRIu64 " refcount "
            "errors, %" PRIu64 " wrong COPIED flags, %" PRIu64 " refcounts "
            "past the end of the file%s", ck.fn, res->leaks,
            res->errors, res->copied, res->leaks_past_end,
            ck.rc_damaged ? ", damaged refcount structures" : "");
  if (!repair ||
      (res->leaks == 0 && res->errors == 0 && res->copied == 0 &&
       res->leaks_past_end == 0 && !ck.rc_damaged)) {
    r = 0;
    goto out;
  }

  /* From here a crash leaves the image half repaired: mark it dirty,
   * so that the next read-write open (ours by default, or QEMU's)
   * repairs it again.  v2 has no dirty bit.
   */
  if (mark_dirty (img) == -1)
    goto out;
  if (blocks_suffice (&ck)) {
    if (fix_in_place (&ck, true, &res->errors_fixed) == -1 ||
        copied_flags (&ck, CP_CLEAR, &copied) == -1 ||
        fix_in_place (&ck, false, &res->leaks_fixed) == -1 ||
        copied_flags (&ck, CP_SET, &copied) == -1)
      goto out;
  }
  else {
    if (rebuild (&ck) == -1 || copied_flags (&ck, CP_CLEAR, &copied) == -1 ||
        copied_flags (&ck, CP_SET, &copied) == -1)
      goto out;
    res->rebuilt = true;
    res->leaks_fixed = res->leaks;
    res->errors_fixed = res->errors;
  }
  res->copied_fixed = copied;
  r = 0;
 out:
  chk_free (&ck);
  return r;
}

/* Log a summary of what the check found or fixed. */
void
q2_check_report (struct q2_image *img, const struct q2_check_result *res,
                 bool repaired)
{
  if (res->leaks == 0 && res->errors == 0 && res->copied == 0 &&
      res->leaks_past_end == 0 && !res->rc_damaged) {
    q2_debug ("%s: check: no errors, no leaks", img->filename);
    return;
  }
  if (repaired)
    q2_error ("%s: warning: repaired %" PRIu64 " leaked clusters, %"
              PRIu64 " refcount errors and %" PRIu64 " wrong COPIED flags%s",
              img->filename, res->leaks_fixed, res->errors_fixed,
              res->copied_fixed,
              res->rebuilt ? " (new refcount structures)" : "");
  else
    q2_error ("%s: warning: check found %" PRIu64 " leaked clusters, %"
              PRIu64 " refcount errors and %" PRIu64 " wrong COPIED flags "
              "(%" PRIu64 " refcounts past the end of the file)%s",
              img->filename, res->leaks, res->errors, res->copied,
              res->leaks_past_end,
              res->rc_damaged ? "; the refcount structures are damaged" : "");
}

/* The check at open reads only, so it is safe even under -r, which
 * the plugin cannot know about yet (.get_ready).  Its findings decide
 * whether writes will be allowed; the repair itself waits for the
 * first write, because until then nothing may be written: a read-only
 * serve, or a read-write one that never writes, leaves the file as it
 * was.
 */
void
q2_check_at_open (struct q2_image *img)
{
  struct q2_check_result res;

  if (img->readonly ||
      (img->repair != Q2_REPAIR_CHECK && img->repair != Q2_REPAIR_ALL))
    return;
  if (q2_check (img, false, &res) == -1) {
    img->check_failed = true;
    return;
  }
  q2_check_report (img, &res, false);
  if (img->repair == Q2_REPAIR_CHECK &&
      (res.errors || res.copied || res.rc_damaged))
    img->check_failed = true;
}

static int
clear_dirty (struct q2_image *img)
{
  uint8_t b[8];

  if (!(img->h.incompat & QCOW2_INCOMPAT_DIRTY))
    return 0;
  put_be64 (b, img->h.incompat & ~QCOW2_INCOMPAT_DIRTY);
  if (q2_write_file (img, b, 8, QH_INCOMPAT) == -1 ||
      img->io->ops->flush (img->io) == -1)
    return -1;
  img->h.incompat &= ~QCOW2_INCOMPAT_DIRTY;
  return 0;
}

int
q2_check_before_write (struct q2_image *img)
{
  bool dirty = img->h.incompat & QCOW2_INCOMPAT_DIRTY;
  struct q2_check_result res;

  if (!(img->repair == Q2_REPAIR_ALL ||
        (img->repair == Q2_REPAIR_AUTO && dirty)))
    return 0;
  if (dirty)
    q2_error ("%s: warning: the image is dirty (lazy refcounts not written "
              "back); rebuilding its refcounts", img->filename);
  if (q2_check (img, true, &res) == -1) {
    if (res.corrupt)
      img->check_failed = true;
    return -1;
  }
  q2_check_report (img, &res, true);
  if (clear_dirty (img) == -1)
    return -1;
  /* Done: a later failed write setup does not check again. */
  img->repair = Q2_REPAIR_OFF;
  return 0;
}
