/* nbdkit-qcow2: the set of clusters that hold metadata, for overlap
 * checks.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * The overlap set records every cluster that holds metadata, so that
 * no data write, through a damaged L2 entry or a damaged refcount, can
 * land on one.  It grows with the metadata, not with the virtual size.
 */

#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"
#include "qcow2-cache.h"

/* ---- the set of metadata clusters (open addressing) ---- */

#define EMPTY 0
#define GONE UINT64_MAX

struct q2_meta_set {
  uint64_t *slot;               /* cluster index + 1, EMPTY or GONE */
  size_t cap, used;             /* used counts GONE slots too */
};

static size_t
meta_hash (const struct q2_meta_set *m, uint64_t key)
{
  return (key * UINT64_C (0x9e3779b97f4a7c15)) >> 20 & (m->cap - 1);
}

static bool
meta_has (const struct q2_meta_set *m, uint64_t cluster)
{
  size_t i = meta_hash (m, cluster + 1);

  while (m->slot[i] != EMPTY) {
    if (m->slot[i] == cluster + 1)
      return true;
    i = (i + 1) & (m->cap - 1);
  }
  return false;
}

static void
meta_put (struct q2_meta_set *m, uint64_t key)
{
  size_t i = meta_hash (m, key);

  while (m->slot[i] != EMPTY && m->slot[i] != GONE) {
    if (m->slot[i] == key)
      return;
    i = (i + 1) & (m->cap - 1);
  }
  if (m->slot[i] == EMPTY)
    m->used++;
  m->slot[i] = key;
}

static int
meta_grow (struct q2_meta_set *m)
{
  uint64_t *old = m->slot;
  size_t i, oldcap = m->cap;

  m->cap = oldcap ? oldcap * 2 : 1024;
  m->slot = calloc (m->cap, sizeof *m->slot);
  if (m->slot == NULL) {
    m->slot = old;
    m->cap = oldcap;
    return -1;
  }
  m->used = 0;
  for (i = 0; i < oldcap; i++)
    if (old[i] != EMPTY && old[i] != GONE)
      meta_put (m, old[i]);
  free (old);
  return 0;
}

int
q2_meta_add (struct q2_image *img, uint64_t off, uint64_t len)
{
  struct q2_meta_set *m = img->meta;
  uint64_t c;

  for (c = off >> img->cluster_bits;
       c <= (off + len - 1) >> img->cluster_bits; c++) {
    if ((m->used + 1) * 2 > m->cap && meta_grow (m) == -1)
      return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
    meta_put (m, c + 1);
  }
  return 0;
}

/* Remove the cluster at off (tables are removed by their first cluster;
 * a multi-cluster table is only ever removed whole by the caller).
 */
void
q2_meta_remove (struct q2_image *img, uint64_t off)
{
  struct q2_meta_set *m = img->meta;
  uint64_t key = (off >> img->cluster_bits) + 1;
  size_t i = meta_hash (m, key);

  while (m->slot[i] != EMPTY) {
    if (m->slot[i] == key) {
      m->slot[i] = GONE;
      return;
    }
    i = (i + 1) & (m->cap - 1);
  }
}

static int
add_l1_tree (struct q2_image *img, const uint64_t *l1, uint32_t n)
{
  uint32_t i;

  for (i = 0; i < n; i++)
    if ((l1[i] & L1E_OFFSET_MASK) &&
        q2_meta_add (img, l1[i] & L1E_OFFSET_MASK, img->cluster_size) == -1)
      return -1;
  return 0;
}

static int
add_snapshots (struct q2_image *img)
{
  uint32_t i;

  if (img->nb_snaps &&
      q2_meta_add (img, img->h.snapshots_offset, img->snap_table_len) == -1)
    return -1;
  for (i = 0; i < img->nb_snaps; i++) {
    struct q2_snapshot *sn = &img->snaps[i];
    uint64_t *l1;
    int r;

    if (sn->l1_size == 0)
      continue;
    if (q2_meta_add (img, sn->l1_offset, (uint64_t) sn->l1_size * 8) == -1 ||
        q2_load_l1 (img, sn->l1_offset, sn->l1_size, &l1) == -1)
      return -1;
    r = add_l1_tree (img, l1, sn->l1_size);
    free (l1);
    if (r == -1)
      return -1;
  }
  return 0;
}

int
q2_meta_init (struct q2_image *img)
{
  uint64_t i;

  img->meta = calloc (1, sizeof *img->meta);
  if (img->meta == NULL || meta_grow (img->meta) == -1)
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
  if (q2_meta_add (img, 0, img->cluster_size) == -1 ||
      (img->l1_size &&
       q2_meta_add (img, img->l1_offset, (uint64_t) img->l1_size * 8) == -1) ||
      q2_meta_add (img, img->reftable_offset, img->reftable_entries * 8) == -1)
    return -1;
  for (i = 0; i < img->reftable_entries; i++)
    if (img->reftable[i] &&
        q2_meta_add (img, img->reftable[i], img->cluster_size) == -1)
      return -1;
  if (add_l1_tree (img, img->l1, img->l1_size) == -1)
    return -1;
  if (img->h.nb_bitmaps && img->h.bitmap_dir_size &&
      img->h.bitmap_dir_offset < img->file_size &&
      img->h.bitmap_dir_size <= img->file_size - img->h.bitmap_dir_offset &&
      q2_meta_add (img, img->h.bitmap_dir_offset,
                   img->h.bitmap_dir_size) == -1)
    return -1;
  if (img->crypt && img->crypt_host_iv &&
      q2_meta_add (img, img->h.crypto_offset, img->h.crypto_length) == -1)
    return -1;
  return add_snapshots (img);
}

void
q2_meta_free (struct q2_image *img)
{
  if (img->meta)
    free (img->meta->slot);
  free (img->meta);
  img->meta = NULL;
}

int
q2_check_overlap (struct q2_image *img, uint64_t off, uint64_t len)
{
  uint64_t c;

  for (c = off >> img->cluster_bits;
       c <= (off + len - 1) >> img->cluster_bits; c++) {
    if (meta_has (img->meta, c)) {
      q2_error ("%s: refusing to write guest data to host offset 0x%" PRIx64
                ", which holds metadata; marking the image corrupt",
                img->filename, c << img->cluster_bits);
      q2_mark_corrupt (img);
      errno = EIO;
      return -1;
    }
  }
  return 0;
}
