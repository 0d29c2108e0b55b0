/* nbdkit-qcow2: creating, applying and deleting internal snapshots.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * These run at startup, before any request, on an image open read-write
 * on its active layer.  A refcount counts references per path, as
 * qemu-img check does: a cluster reached from two L1 tables (the active
 * one and a snapshot's, even through one shared L2 table) has refcount
 * 2, and COPIED is set on an active L1 or L2 entry exactly when the
 * cluster it points at has refcount 1.
 *
 * Crash order (QEMU's, except that apply writes the new active L1 to new
 * clusters and switches the header to it instead of overwriting the L1
 * in place).  Each step is flushed before the next one starts:
 *  1. take the refcount increments: the tree that gains a reference
 *     (create: the active tree; apply: the snapshot's), and the new
 *     clusters (L1 copy, snapshot table);
 *  2. fix the COPIED flags for the refcounts the operation ends with:
 *     create clears them (after 1), apply computes them for the new L1
 *     and clears stale ones in the snapshot's L2 tables (before the
 *     switch), delete sets them where the deleted snapshot held the
 *     only other reference (after the switch, before 4);
 *  3. write the new snapshot table or L1 table, in new clusters, and
 *     switch the header to it with ONE write (snapshot count and offset;
 *     or size, L1 size and L1 offset);
 *  4. drop the references of whatever is no longer reachable: the old
 *     snapshot table, the deleted snapshot's L1 tree, the old active L1
 *     tree (refcounts may then reach 0 and clusters be reused).
 * So a refcount is never lower than the references on disk: a crash at
 * any point leaves at most leaks.  A COPIED flag can disagree with the
 * refcount on disk only while that refcount is leaked and the cluster
 * has a single reference (create between 1 and 2, delete between 2 and
 * 4): qemu-img check lists such a flag as an error until the leak is
 * repaired (-r leaks), but writing in place there is safe, as no
 * snapshot uses the cluster.  No order avoids every such window, since
 * a refcount and its flag live in different clusters; QEMU's own order
 * has them too (its delete even leaves flags missing on refcounts of
 * 1 for a while).  test-snapshot-crash checks exactly this.
 */

#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qcow2-internal.h"
#include "qcow2-cache.h"

#define BAD(...) Q2_FAIL (EINVAL, __VA_ARGS__)

/* QEMU refuses snapshot tables larger than this. */
#define MAX_TABLE_BYTES (64 * 1024 * 1024)
/* What qemu-img 7.2 writes: vm_state_size_large, disk_size, icount. */
#define EXTRA_DATA_SIZE 24

/* ---- references of one L1 tree, counted per cluster ---- */

struct ref {
  uint64_t key;                 /* cluster index + 1; 0: empty */
  uint32_t n;                   /* references */
  bool l2;                      /* an L2 table */
};

struct refmap {
  struct ref *slot;
  size_t cap, used;
};

static size_t
ref_hash (const struct refmap *m, uint64_t key)
{
  return (key * UINT64_C (0x9e3779b97f4a7c15)) >> 17 & (m->cap - 1);
}

static struct ref *
ref_find (const struct refmap *m, uint64_t cluster)
{
  size_t i;

  if (m == NULL || m->cap == 0)
    return NULL;
  for (i = ref_hash (m, cluster + 1); m->slot[i].key;
       i = (i + 1) & (m->cap - 1))
    if (m->slot[i].key == cluster + 1)
      return &m->slot[i];
  return NULL;
}

static int
ref_grow (struct q2_image *img, struct refmap *m)
{
  struct refmap n = { .cap = m->cap ? m->cap * 2 : 4096 };
  size_t i, j;

  n.slot = calloc (n.cap, sizeof *n.slot);
  if (n.slot == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
  for (i = 0; i < m->cap; i++) {
    if (m->slot[i].key == 0)
      continue;
    for (j = ref_hash (&n, m->slot[i].key); n.slot[j].key;
         j = (j + 1) & (n.cap - 1))
      ;
    n.slot[j] = m->slot[i];
    n.used++;
  }
  free (m->slot);
  *m = n;
  return 0;
}

static int
ref_add (struct q2_image *img, struct refmap *m, uint64_t cluster, bool l2)
{
  struct ref *r = ref_find (m, cluster);
  size_t i;

  if (r == NULL) {
    if ((m->used + 1) * 2 > m->cap && ref_grow (img, m) == -1)
      return -1;
    for (i = ref_hash (m, cluster + 1); m->slot[i].key;
         i = (i + 1) & (m->cap - 1))
      ;
    r = &m->slot[i];
    r->key = cluster + 1;
    m->used++;
  }
  if (r->n == UINT32_MAX)
    return Q2_FAIL (EINVAL, "%s: cluster at 0x%" PRIx64 " is referenced "
                    "too often", img->filename, cluster << img->cluster_bits);
  r->n++;
  r->l2 |= l2;
  return 0;
}

static void
ref_free (struct refmap *m)
{
  free (m->slot);
  m->slot = NULL;
  m->cap = m->used = 0;
}

static uint32_t
ref_count (const struct refmap *m, uint64_t cluster)
{
  const struct ref *r = ref_find (m, cluster);

  return r ? r->n : 0;
}

/* One L2 table, read through the L2 cache (it may hold newer data). */
static int
read_l2 (struct q2_image *img, uint64_t l2_off, uint8_t *buf)
{
  size_t slice = q2_cache_slice_size (img->l2_cache);
  uint64_t i;

  for (i = 0; i < img->cluster_size; i += slice)
    if (q2_cache_read (img->l2_cache, l2_off + i, buf + i, slice) == -1)
      return -1;
  return 0;
}

static int
check_l2_offset (struct q2_image *img, uint64_t l1e, uint64_t l1_off,
                 uint32_t i)
{
  uint64_t l2 = l1e & L1E_OFFSET_MASK;

  if ((l1e & L1E_RESERVED_MASK) || (l2 & (img->cluster_size - 1)) ||
      l2 >= img->file_size || img->cluster_size > img->file_size - l2)
    return BAD ("%s: L1 entry at file offset %" PRIu64 " is invalid (0x%016"
                PRIx64 ")", img->filename, l1_off + (uint64_t) i * 8, l1e);
  return 0;
}

/* Count every reference of the tree under l1 (stored at l1_off). */
static int
collect (struct q2_image *img, const uint64_t *l1, uint32_t n,
         uint64_t l1_off, struct refmap *m)
{
  uint8_t *buf = malloc (img->cluster_size);
  uint64_t entries = img->cluster_size / img->l2e_size, j, c;
  uint32_t i;
  int r = 0;

  if (buf == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
  for (i = 0; i < n && r == 0; i++) {
    uint64_t l2 = l1[i] & L1E_OFFSET_MASK;

    if (l2 == 0)
      continue;
    r = check_l2_offset (img, l1[i], l1_off, i);
    if (r == 0)
      r = ref_add (img, m, l2 >> img->cluster_bits, true);
    if (r == 0)
      r = read_l2 (img, l2, buf);
    for (j = 0; j < entries && r == 0; j++) {
      uint64_t e = get_be64 (buf + j * img->l2e_size), host, len;

      if (e & QCOW_OFLAG_COMPRESSED) {
        q2_cdesc_decode (img->cluster_bits, e & ~QCOW_OFLAG_COMPRESSED,
                         &host, &len);
        for (c = host >> img->cluster_bits;
             c <= (host + len - 1) >> img->cluster_bits && r == 0; c++)
          r = ref_add (img, m, c, false);
      }
      else if ((host = e & L2E_OFFSET_MASK) != 0) {
        if (host & (img->cluster_size - 1))
          r = BAD ("%s: L2 entry at file offset %" PRIu64 " is misaligned "
                   "(0x%016" PRIx64 ")", img->filename,
                   l2 + j * img->l2e_size, e);
        else
          r = ref_add (img, m, host >> img->cluster_bits, false);
      }
    }
  }
  free (buf);
  return r;
}

static uint64_t
rc_limit (const struct q2_image *img)
{
  return img->refcount_bits == 64 ? UINT64_MAX
                                  : (UINT64_C (1) << img->refcount_bits) - 1;
}

/* Before anything is written: may each refcount move by sign * n? */
static int
check_refs (struct q2_image *img, const struct refmap *m, int sign)
{
  size_t i;
  uint64_t rc;

  for (i = 0; i < m->cap; i++) {
    const struct ref *r = &m->slot[i];
    uint64_t c = r->key - 1;

    if (r->key == 0)
      continue;
    if (q2_rc_get (img, c, &rc) == -1)
      return -1;
    if (rc < r->n)
      return Q2_FAIL (EIO, "%s: cluster at 0x%" PRIx64 " has %" PRIu32
                      " references but refcount %" PRIu64 "; repair the "
                      "image (qemu-img check -r all) first", img->filename,
                      c << img->cluster_bits, r->n, rc);
    if (sign > 0 && rc_limit (img) - rc < r->n)
      return Q2_FAIL (ERANGE, "%s: the refcount of cluster at 0x%" PRIx64
                      " would exceed its maximum with refcount_bits=%u",
                      img->filename, c << img->cluster_bits,
                      img->refcount_bits);
  }
  return 0;
}

/* Drop one reference to each cluster of [off, off+len). */
static int
drop (struct q2_image *img, uint64_t off, uint64_t len, uint32_t n, bool l2)
{
  uint64_t c, rc;

  for (c = off >> img->cluster_bits;
       c <= (off + len - 1) >> img->cluster_bits; c++) {
    if (q2_rc_add (img, c, -(int) n) == -1 || q2_rc_get (img, c, &rc) == -1)
      return -1;
    if (rc == 0) {
      q2_meta_remove (img, c << img->cluster_bits);
      if (l2)                   /* never write a freed table back */
        q2_cache_discard (img->l2_cache, c << img->cluster_bits,
                          img->cluster_size);
    }
  }
  return 0;
}

/* Apply sign * count to every refcount in m. */
static int
apply_refs (struct q2_image *img, const struct refmap *m, int sign)
{
  size_t i;

  for (i = 0; i < m->cap; i++) {
    const struct ref *r = &m->slot[i];

    if (r->key == 0)
      continue;
    if (sign > 0 && q2_rc_add (img, r->key - 1, (int) r->n) == -1)
      return -1;
    if (sign < 0 &&
        drop (img, (r->key - 1) << img->cluster_bits, 1, r->n, r->l2) == -1)
      return -1;
  }
  return 0;
}

/* Everything written so far reaches the disk: L2 tables (refcounts
 * first, by the cache dependency), refcounts, then a sync.
 */
static int
sync_all (struct q2_image *img)
{
  if (q2_cache_flush (img->l2_cache) == -1 || q2_rc_flush (img) == -1)
    return -1;
  return img->io->ops->flush (img->io);
}

static int
write_l1 (struct q2_image *img, const uint64_t *l1, uint32_t n,
          uint64_t off)
{
  uint64_t *b;
  uint32_t i;
  int r;

  if (n == 0)
    return 0;
  b = malloc ((size_t) n * 8);
  if (b == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
  for (i = 0; i < n; i++)
    b[i] = htobe64 (l1[i]);
  r = q2_write_file (img, b, (size_t) n * 8, off);
  free (b);
  return r;
}

/* COPIED exactly where the refcount, less what sub will drop, is 1:
 * on the L2 entries of the tree (through the L2 cache) and on l1 (in
 * memory; written to l1_off if that is not 0).
 */
static int
fix_copied (struct q2_image *img, uint64_t *l1, uint32_t n, uint64_t l1_off,
            const struct refmap *sub)
{
  uint8_t *buf = malloc (img->cluster_size);
  uint64_t entries = img->cluster_size / img->l2e_size, j, rc;
  bool l1_changed = false;
  uint32_t i;
  int r = 0;

  if (buf == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
  for (i = 0; i < n && r == 0; i++) {
    uint64_t l2 = l1[i] & L1E_OFFSET_MASK, want;

    if (l2 == 0)
      continue;
    r = read_l2 (img, l2, buf);
    for (j = 0; j < entries && r == 0; j++) {
      uint64_t e = get_be64 (buf + j * img->l2e_size), host, ne;
      uint8_t b[8];

      host = e & L2E_OFFSET_MASK;
      ne = e & ~QCOW_OFLAG_COPIED;
      if (!(e & QCOW_OFLAG_COMPRESSED) && host) {
        r = q2_rc_get (img, host >> img->cluster_bits, &rc);
        if (r == 0 && rc - ref_count (sub, host >> img->cluster_bits) == 1)
          ne |= QCOW_OFLAG_COPIED;
      }
      if (r == 0 && ne != e) {
        put_be64 (b, ne);
        r = q2_cache_write (img->l2_cache, l2 + j * img->l2e_size, b, 8);
      }
    }
    if (r == 0)
      r = q2_rc_get (img, l2 >> img->cluster_bits, &rc);
    if (r == 0) {
      want = l1[i] & ~QCOW_OFLAG_COPIED;
      if (rc - ref_count (sub, l2 >> img->cluster_bits) == 1)
        want |= QCOW_OFLAG_COPIED;
      if (want != l1[i]) {
        l1[i] = want;
        l1_changed = true;
      }
    }
  }
  free (buf);
  if (r == 0 && l1_changed && l1_off)
    r = write_l1 (img, l1, n, l1_off);
  return r;
}

/* bytes in new contiguous clusters (refcount 1, in the cache). */
static int
alloc_bytes (struct q2_image *img, uint64_t bytes, uint64_t *off)
{
  uint64_t n = (bytes + img->cluster_size - 1) >> img->cluster_bits, got;

  for (;;) {
    if (q2_alloc_clusters (img, n, off, &got) == -1)
      return -1;
    if (got == n)
      break;
    /* Too short a gap: give it back and search past it. */
    if (q2_free_now (img, *off, got << img->cluster_bits) == -1)
      return -1;
    img->free_hint = (*off >> img->cluster_bits) + got;
  }
  img->free_hint = 0;           /* the gaps we skipped are free again */
  return q2_meta_add (img, *off, bytes);
}

/* ---- the snapshot table ---- */

static size_t
pad8 (uint64_t n)
{
  return (n + 7) & ~UINT64_C (7);
}

/* The table without entry skip (or with all of them), plus new_entry
 * (of new_len bytes) if not NULL.  Entries are copied as they are, so
 * fields and extra data we do not interpret survive.
 */
static int
build_table (struct q2_image *img, const struct q2_snapshot *skip,
             const uint8_t *new_entry, size_t new_len, uint8_t **out,
             size_t *out_len)
{
  size_t len = new_len, pos = 0;
  uint32_t i;
  uint8_t *t;

  for (i = 0; i < img->nb_snaps; i++)
    if (&img->snaps[i] != skip)
      len += pad8 (img->snaps[i].entry_len);
  if (len > MAX_TABLE_BYTES)
    return Q2_FAIL (ENOSPC, "%s: the snapshot table would exceed %d bytes",
                    img->filename, MAX_TABLE_BYTES);
  t = calloc (1, len ? len : 1);
  if (t == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
  for (i = 0; i < img->nb_snaps; i++) {
    const struct q2_snapshot *sn = &img->snaps[i];

    if (sn == skip)
      continue;
    if (q2_io_pread (img->io, t + pos, sn->entry_len, sn->entry_off) == -1) {
      free (t);
      return -1;
    }
    pos += pad8 (sn->entry_len);
  }
  if (new_entry)
    memcpy (t + pos, new_entry, new_len);
  *out = t;
  *out_len = len;
  return 0;
}

/* Write the table to new clusters and switch the header to it with one
 * write; then free the old table and reload ours.
 */
static int
switch_table (struct q2_image *img, const uint8_t *t, size_t len,
              uint32_t nb)
{
  uint64_t off = 0, old_off = img->h.snapshots_offset;
  uint64_t old_len = img->snap_table_len;
  uint8_t hdr[12];

  if (len) {
    if (alloc_bytes (img, len, &off) == -1 ||
        q2_write_file (img, t, len, off) == -1)
      return -1;
  }
  if (sync_all (img) == -1)
    return -1;
  put_be32 (hdr, nb);
  put_be64 (hdr + 4, off);
  if (q2_write_file (img, hdr, sizeof hdr, QH_NB_SNAPSHOTS) == -1 ||
      img->io->ops->flush (img->io) == -1)
    return -1;
  img->h.nb_snapshots = nb;
  img->h.snapshots_offset = off;
  if (img->nb_snaps && old_len && q2_free_now (img, old_off, old_len) == -1)
    return -1;
  q2_snapshot_free_table (img);
  img->snap_table_len = 0;
  return q2_snapshot_load_table (img);
}

/* ---- the operations ---- */

typedef int (*op_fn) (struct q2_image *, const char *, bool);

/* The first write of a session already changes the header (bitmaps
 * flagged in use, autoclear bits dropped, the dirty bit of lazy
 * refcounts), so an operation that its checks refuse (a refcount that
 * would overflow, a damaged tree) is checked before that, against the
 * refcounts on disk, and a refused one leaves the file as it was.
 * Not for a dirty image (or repair=all), whose refcounts the first
 * write rebuilds first.
 */
static int
precheck (struct q2_image *img, op_fn fn, const char *arg)
{
  int r;

  if (img->write_started || img->repair == Q2_REPAIR_ALL ||
      (img->h.incompat & QCOW2_INCOMPAT_DIRTY))
    return 0;
  pthread_mutex_lock (&img->lock);
  r = q2_rc_init (img);
  if (r == 0)
    r = fn (img, arg, true);
  q2_rc_free (img);
  pthread_mutex_unlock (&img->lock);
  return r;
}

static int
prepare (struct q2_image *img, const char *what, op_fn fn, const char *arg)
{
  if (img->snapshot)
    return Q2_FAIL (EROFS, "%s: cannot %s while serving snapshot '%s'",
                    img->filename, what, img->snapshot);
  if (img->h.incompat & QCOW2_INCOMPAT_DATA_FILE)
    return Q2_FAIL (ENOTSUP, "%s: cannot %s: internal snapshots are not "
                    "supported with an external data file", img->filename,
                    what);
  if (img->raw)
    return Q2_FAIL (ENOTSUP, "%s: not a qcow2 image", img->filename);
  if (precheck (img, fn, arg) == -1)
    return -1;
  if (q2_begin_write (img) == -1)
    return Q2_FAIL (errno, "%s: cannot %s", img->filename, what);
  return 0;
}

/* As QEMU: one more than the largest numeric ID. */
static void
next_id (struct q2_image *img, char *id, size_t n)
{
  unsigned long long max = 0, v;
  char *end;
  uint32_t i;

  for (i = 0; i < img->nb_snaps; i++) {
    v = strtoull (img->snaps[i].id, &end, 10);
    if (*end == '\0' && v > max)
      max = v;
  }
  snprintf (id, n, "%llu", max + 1);
}

/* The operations below, with check_only, stop after their checks,
 * before anything is written: see precheck().
 */
static int
create_locked (struct q2_image *img, const char *name, bool check_only)
{
  struct refmap m = { 0 };
  uint8_t *entry = NULL, *table = NULL;
  size_t name_len = strlen (name), id_len, elen, tlen;
  uint64_t l1_copy = 0;
  struct timespec now;
  char id[32];
  uint32_t i;
  int r = -1;

  if (name_len == 0 || name_len > UINT16_MAX)
    return BAD ("%s: snapshot-create: the name must be 1 to 65535 bytes",
                img->filename);
  for (i = 0; i < img->nb_snaps; i++)
    if (strcmp (img->snaps[i].name, name) == 0)
      return Q2_FAIL (EEXIST, "%s: snapshot-create: a snapshot named '%s' "
                      "exists already (ID %s)", img->filename, name,
                      img->snaps[i].id);
  if (img->nb_snaps >= QCOW2_MAX_SNAPSHOTS)
    return Q2_FAIL (ENOSPC, "%s: snapshot-create: too many snapshots",
                    img->filename);
  next_id (img, id, sizeof id);
  id_len = strlen (id);

  /* 1. Increments for the active tree. */
  if (collect (img, img->l1, img->l1_size, img->l1_offset, &m) == -1 ||
      check_refs (img, &m, 1) == -1)
    goto out;
  if (check_only) {
    r = 0;
    goto out;
  }
  if (apply_refs (img, &m, 1) == -1 || sync_all (img) == -1)
    goto out;
  /* 2. COPIED flags off wherever the snapshot now shares. */
  if (fix_copied (img, img->l1, img->l1_size, img->l1_offset, NULL) == -1 ||
      sync_all (img) == -1)
    goto out;
  /* 3. The L1 copy and the new table, then the header switch. */
  if (img->l1_size &&
      (alloc_bytes (img, (uint64_t) img->l1_size * 8, &l1_copy) == -1 ||
       write_l1 (img, img->l1, img->l1_size, l1_copy) == -1))
    goto out;
  elen = QSN_FIXED_SIZE + EXTRA_DATA_SIZE + id_len + name_len;
  entry = calloc (1, elen);
  if (entry == NULL) {
    (void) Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
    goto out;
  }
  clock_gettime (CLOCK_REALTIME, &now);
  put_be64 (entry + QSN_L1_OFFSET, l1_copy);
  put_be32 (entry + QSN_L1_SIZE, img->l1_size);
  put_be16 (entry + QSN_ID_LEN, id_len);
  put_be16 (entry + QSN_NAME_LEN, name_len);
  put_be32 (entry + QSN_DATE_SEC, now.tv_sec);
  put_be32 (entry + QSN_DATE_NSEC, now.tv_nsec);
  /* vm_clock_nsec, vm_state_size: 0 (no VM state). */
  put_be32 (entry + QSN_EXTRA_SIZE, EXTRA_DATA_SIZE);
  put_be64 (entry + QSN_FIXED_SIZE + QSN_EXTRA_DISK_SIZE, img->size);
  memcpy (entry + QSN_FIXED_SIZE + EXTRA_DATA_SIZE, id, id_len);
  memcpy (entry + QSN_FIXED_SIZE + EXTRA_DATA_SIZE + id_len, name, name_len);
  if (build_table (img, NULL, entry, elen, &table, &tlen) == -1 ||
      switch_table (img, table, tlen, img->nb_snaps + 1) == -1)
    goto out;
  /* 4. The old table was freed by switch_table. */
  r = sync_all (img);
  if (r == 0)
    q2_debug ("%s: created snapshot '%s' (ID %s)", img->filename, name, id);

 out:
  ref_free (&m);
  free (entry);
  free (table);
  return r;
}

static int
delete_locked (struct q2_image *img, const char *id_or_name, bool check_only)
{
  struct q2_snapshot *sn = q2_snapshot_find (img, id_or_name);
  struct refmap m = { 0 };
  uint64_t *sl1 = NULL, sl1_off, sl1_size;
  uint8_t *table = NULL;
  size_t tlen;
  char label[128];
  int r = -1;

  if (sn == NULL)
    return Q2_FAIL (ENOENT, "%s: snapshot-delete: no snapshot with ID or "
                    "name '%s'", img->filename, id_or_name);
  sl1_off = sn->l1_offset;
  sl1_size = sn->l1_size;
  snprintf (label, sizeof label, "'%s' (ID %s)", sn->name, sn->id);
  if (q2_load_l1 (img, sl1_off, sl1_size, &sl1) == -1 ||
      collect (img, sl1, sl1_size, sl1_off, &m) == -1 ||
      check_refs (img, &m, -1) == -1)
    goto out;
  if (check_only) {
    r = 0;
    goto out;
  }
  /* 3. The table without it, then the header switch (sn is gone). */
  if (build_table (img, sn, NULL, 0, &table, &tlen) == -1 ||
      switch_table (img, table, tlen, img->nb_snaps - 1) == -1)
    goto out;
  sn = NULL;
  /* 2. COPIED flags on where only the active layer will be left. */
  if (fix_copied (img, img->l1, img->l1_size, img->l1_offset, &m) == -1 ||
      sync_all (img) == -1)
    goto out;
  /* 4. Its references, then its L1 table. */
  if (apply_refs (img, &m, -1) == -1 ||
      (sl1_size && drop (img, sl1_off, sl1_size * 8, 1, false) == -1))
    goto out;
  r = sync_all (img);
  if (r == 0)
    q2_debug ("%s: deleted snapshot %s", img->filename, label);

 out:
  ref_free (&m);
  free (sl1);
  free (table);
  return r;
}

static int
apply_locked (struct q2_image *img, const char *id_or_name, bool check_only)
{
  struct q2_snapshot *sn = q2_snapshot_find (img, id_or_name);
  uint64_t span = UINT64_C (1) << (img->cluster_bits + img->l2_bits);
  struct refmap snap_refs = { 0 }, old_refs = { 0 };
  uint64_t *nl1 = NULL, *old_l1 = img->l1, new_off = 0, disk_size;
  uint64_t old_off = img->l1_offset;
  uint32_t n, old_size = img->l1_size;
  uint8_t hdr[24];
  int r = -1;

  if (sn == NULL)
    return Q2_FAIL (ENOENT, "%s: snapshot-apply: no snapshot with ID or "
                    "name '%s'", img->filename, id_or_name);
  n = sn->l1_size;
  disk_size = sn->disk_size;
  if (disk_size > INT64_MAX - span || disk_size / span +
      (disk_size % span != 0) > n)
    return BAD ("%s: snapshot '%s' has an L1 table too small for its size",
                img->filename, id_or_name);
  if (q2_load_l1 (img, sn->l1_offset, n, &nl1) == -1 ||
      collect (img, nl1, n, sn->l1_offset, &snap_refs) == -1 ||
      collect (img, old_l1, old_size, old_off, &old_refs) == -1 ||
      check_refs (img, &snap_refs, 1) == -1 ||
      check_refs (img, &old_refs, -1) == -1)
    goto out;
  if (check_only) {
    r = 0;
    goto out;
  }
  /* 1. Increments for the snapshot's tree. */
  if (apply_refs (img, &snap_refs, 1) == -1 || sync_all (img) == -1)
    goto out;
  /* 2. Flags for the end state, in the copy that becomes active. */
  if (fix_copied (img, nl1, n, 0, &old_refs) == -1 ||
      sync_all (img) == -1)
    goto out;
  /* 3. The new active L1, then the header switch. */
  if (n && (alloc_bytes (img, (uint64_t) n * 8, &new_off) == -1 ||
            write_l1 (img, nl1, n, new_off) == -1))
    goto out;
  if (sync_all (img) == -1)
    goto out;
  put_be64 (hdr, disk_size);
  put_be32 (hdr + 8, img->h.crypt_method);
  put_be32 (hdr + 12, n);
  put_be64 (hdr + 16, new_off);
  if (q2_write_file (img, hdr, sizeof hdr, QH_SIZE) == -1 ||
      img->io->ops->flush (img->io) == -1)
    goto out;
  img->l1 = nl1;
  nl1 = NULL;
  img->l1_size = img->h.l1_size = n;
  img->l1_offset = img->h.l1_offset = new_off;
  img->size = img->h.size = disk_size;
  /* 4. The old active tree, then its L1 table. */
  if (apply_refs (img, &old_refs, -1) == -1 ||
      (old_size && drop (img, old_off, (uint64_t) old_size * 8, 1,
                         false) == -1))
    goto out;
  r = sync_all (img);
  if (r == 0)
    q2_debug ("%s: applied snapshot '%s'", img->filename, id_or_name);

 out:
  if (img->l1 != old_l1)
    free (old_l1);
  free (nl1);
  ref_free (&snap_refs);
  ref_free (&old_refs);
  return r;
}

static int
run (struct q2_image *img, const char *what, op_fn fn, const char *arg)
{
  int r;

  if (prepare (img, what, fn, arg) == -1)
    return -1;
  pthread_mutex_lock (&img->lock);
  r = fn (img, arg, false);
  pthread_mutex_unlock (&img->lock);
  return r;
}

/* ---- a list of operations, checked before the first one runs ---- */

struct sim {
  char **id, **name;
  size_t n;
};

static const char *const op_key[] = {
  [Q2_SNAP_CREATE] = "snapshot-create",
  [Q2_SNAP_APPLY] = "snapshot-apply",
  [Q2_SNAP_DELETE] = "snapshot-delete",
};

static ssize_t
sim_find (const struct sim *s, const char *x)
{
  size_t i;

  for (i = 0; i < s->n; i++)
    if (s->id[i] && strcmp (s->id[i], x) == 0)
      return i;
  for (i = 0; i < s->n; i++)
    if (s->id[i] && strcmp (s->name[i], x) == 0)
      return i;
  return -1;
}

static int
check_ops (struct q2_image *img, const struct q2_snapshot_op *ops, size_t n)
{
  struct sim s = { .n = img->nb_snaps };
  char buf[32];
  ssize_t k;
  size_t i;
  int r = 0;

  s.id = calloc (img->nb_snaps + n + 1, sizeof *s.id);
  s.name = calloc (img->nb_snaps + n + 1, sizeof *s.name);
  if (s.id == NULL || s.name == NULL) {
    free (s.id);
    free (s.name);
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
  }
  for (i = 0; i < img->nb_snaps; i++) {
    s.id[i] = img->snaps[i].id;
    s.name[i] = img->snaps[i].name;
  }
  /* IDs of created snapshots: only their existence matters here. */
  for (i = 0; i < n && r == 0; i++) {
    const char *a = ops[i].arg;

    if (ops[i].kind < Q2_SNAP_CREATE || ops[i].kind > Q2_SNAP_DELETE)
      r = BAD ("%s: unknown snapshot operation %d", img->filename,
               ops[i].kind);
    else if (ops[i].kind == Q2_SNAP_CREATE) {
      size_t j;

      for (j = 0; j < s.n; j++)
        if (s.id[j] && strcmp (s.name[j], a) == 0)
          break;
      if (j < s.n)
        r = Q2_FAIL (EEXIST, "%s: snapshot-create=%s: a snapshot with that "
                     "name exists%s; nothing was changed", img->filename, a,
                     j < img->nb_snaps ? " already" : " by then");
      else {
        unsigned long long max = 0, v;
        char *end;

        for (j = 0; j < s.n; j++) {
          if (s.id[j] == NULL)
            continue;
          v = strtoull (s.id[j], &end, 10);
          if (*end == '\0' && v > max)
            max = v;
        }
        snprintf (buf, sizeof buf, "%llu", max + 1);
        s.id[s.n] = strdup (buf);
        s.name[s.n++] = (char *) a;
        if (s.id[s.n - 1] == NULL)
          r = Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
      }
    }
    else if ((k = sim_find (&s, a)) == -1)
      r = Q2_FAIL (ENOENT, "%s: %s=%s: no snapshot with that ID or name%s; "
                   "nothing was changed", img->filename, op_key[ops[i].kind],
                   a, i ? " by then" : "");
    else if (ops[i].kind == Q2_SNAP_DELETE) {
      if ((size_t) k >= img->nb_snaps)
        free (s.id[k]);
      s.id[k] = NULL;             /* gone; its slot stays */
    }
  }
  for (i = img->nb_snaps; i < s.n; i++)
    free (s.id[i]);
  free (s.id);
  free (s.name);
  return r;
}

int
q2_snapshot_run (struct q2_image *img, const struct q2_snapshot_op *ops,
                 size_t n)
{
  size_t i;
  int r;

  if (n == 0)
    return 0;
  if (check_ops (img, ops, n) == -1)
    return -1;
  for (i = 0; i < n; i++) {
    switch (ops[i].kind) {
    case Q2_SNAP_CREATE: r = q2_snapshot_create (img, ops[i].arg); break;
    case Q2_SNAP_APPLY: r = q2_snapshot_apply (img, ops[i].arg); break;
    default: r = q2_snapshot_delete (img, ops[i].arg); break;
    }
    if (r == -1)
      return Q2_FAIL (errno, "%s: %s=%s failed%s", img->filename,
                      op_key[ops[i].kind], ops[i].arg,
                      i ? " (the operations before it were done)" : "");
  }
  return 0;
}

int
q2_snapshot_create (struct q2_image *img, const char *name)
{
  return run (img, "create a snapshot", create_locked, name);
}

int
q2_snapshot_apply (struct q2_image *img, const char *id_or_name)
{
  return run (img, "apply a snapshot", apply_locked, id_or_name);
}

int
q2_snapshot_delete (struct q2_image *img, const char *id_or_name)
{
  return run (img, "delete a snapshot", delete_locked, id_or_name);
}
