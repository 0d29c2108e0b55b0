/* nbdkit-qcow2: the internal snapshot table.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * The table is read and validated at open.  Serving a snapshot swaps
 * in its L1 table; such an export is always read-only, so a snapshot's
 * content can never change through us.
 */

#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"

/* QEMU refuses snapshot tables larger than this. */
#define MAX_TABLE_BYTES (64 * 1024 * 1024)

#define BAD(...) Q2_FAIL (EINVAL, __VA_ARGS__)

static char *
read_string (struct q2_image *img, uint64_t off, uint16_t len)
{
  char *s = malloc ((size_t) len + 1);

  if (s == NULL)
    return NULL;
  if (q2_io_pread (img->io, s, len, off) == -1) {
    free (s);
    return NULL;
  }
  s[len] = '\0';
  return s;
}

/* Parse the entry at *off; advance *off past it. */
static int
parse_entry (struct q2_image *img, uint32_t i, uint64_t *off,
             struct q2_snapshot *sn)
{
  uint8_t fixed[QSN_FIXED_SIZE + 16];
  uint32_t extra;
  uint16_t id_len, name_len;
  uint64_t len, start = *off;

  if (q2_io_pread (img->io, fixed, sizeof fixed, start) == -1)
    return -1;
  sn->l1_offset = get_be64 (fixed + QSN_L1_OFFSET);
  sn->l1_size = get_be32 (fixed + QSN_L1_SIZE);
  id_len = get_be16 (fixed + QSN_ID_LEN);
  name_len = get_be16 (fixed + QSN_NAME_LEN);
  extra = get_be32 (fixed + QSN_EXTRA_SIZE);
  sn->disk_size = img->h.size;
  if (extra > QCOW2_MAX_SNAPSHOT_EXTRA)
    return BAD ("%s: snapshot %" PRIu32 " at file offset %" PRIu64 " has "
                "extra_data_size %" PRIu32 ", too large", img->filename, i,
                start, extra);
  if (extra >= 16)
    sn->disk_size = get_be64 (fixed + QSN_FIXED_SIZE + QSN_EXTRA_DISK_SIZE);
  len = QSN_FIXED_SIZE + (uint64_t) extra + id_len + name_len;
  /* The last entry's padding need not exist in the file. */
  if (start + len - img->h.snapshots_offset > MAX_TABLE_BYTES ||
      start + len > img->file_size)
    return BAD ("%s: snapshot table at file offset %" PRIu64 " runs past "
                "the end of the file or its size limit", img->filename,
                img->h.snapshots_offset);
  if ((uint64_t) sn->l1_size * 8 > QCOW2_MAX_L1_BYTES ||
      (sn->l1_size && (sn->l1_offset % img->cluster_size ||
                       sn->l1_offset > img->file_size ||
                       (uint64_t) sn->l1_size * 8 >
                       img->file_size - sn->l1_offset)))
    return BAD ("%s: snapshot %" PRIu32 " (entry at file offset %" PRIu64
                ") has an invalid L1 table (offset 0x%" PRIx64 ", %" PRIu32
                " entries)", img->filename, i, start, sn->l1_offset,
                sn->l1_size);
  sn->id = read_string (img, start + QSN_FIXED_SIZE + extra, id_len);
  sn->name = read_string (img, start + QSN_FIXED_SIZE + extra + id_len,
                          name_len);
  if (sn->id == NULL || sn->name == NULL)
    return Q2_FAIL (EIO, "%s: cannot read snapshot %" PRIu32, img->filename,
                    i);
  sn->entry_off = start;
  sn->entry_len = len;
  *off = start + ((len + 7) & ~UINT64_C (7));
  return 0;
}

int
q2_snapshot_load_table (struct q2_image *img)
{
  uint64_t off = img->h.snapshots_offset;
  uint32_t i;

  if (img->h.nb_snapshots == 0)
    return 0;
  img->snaps = calloc (img->h.nb_snapshots, sizeof *img->snaps);
  if (img->snaps == NULL)
    return Q2_FAIL (ENOMEM, "%s: calloc: %m", img->filename);
  for (i = 0; i < img->h.nb_snapshots; i++) {
    img->nb_snaps = i + 1;        /* so that free sees partial entries */
    if (parse_entry (img, i, &off, &img->snaps[i]) == -1)
      return -1;
  }
  img->snap_table_len = off - img->h.snapshots_offset;
  return 0;
}

void
q2_snapshot_free_table (struct q2_image *img)
{
  uint32_t i;

  for (i = 0; i < img->nb_snaps; i++) {
    free (img->snaps[i].id);
    free (img->snaps[i].name);
  }
  free (img->snaps);
  img->snaps = NULL;
  img->nb_snaps = 0;
}

/* As QEMU's snapshot lookup: an ID match first, then a name match. */
static struct q2_snapshot *
find (struct q2_image *img, const char *s)
{
  uint32_t i;

  for (i = 0; i < img->nb_snaps; i++)
    if (strcmp (img->snaps[i].id, s) == 0)
      return &img->snaps[i];
  for (i = 0; i < img->nb_snaps; i++)
    if (strcmp (img->snaps[i].name, s) == 0)
      return &img->snaps[i];
  return NULL;
}

struct q2_snapshot *
q2_snapshot_find (struct q2_image *img, const char *id_or_name)
{
  return find (img, id_or_name);
}

int
q2_snapshot_select (struct q2_image *img, const char *id_or_name)
{
  struct q2_snapshot *sn = find (img, id_or_name);
  uint64_t span = UINT64_C (1) << (img->cluster_bits + img->l2_bits);
  uint64_t *l1;

  if (sn == NULL)
    return Q2_FAIL (ENOENT, "%s: no snapshot with ID or name '%s'",
                    img->filename, id_or_name);
  if (sn->disk_size > INT64_MAX - span ||
      sn->disk_size / span + (sn->disk_size % span != 0) > sn->l1_size)
    return BAD ("%s: snapshot '%s' has an L1 table too small for its size",
                img->filename, id_or_name);
  if (q2_load_l1 (img, sn->l1_offset, sn->l1_size, &l1) == -1)
    return -1;
  free (img->l1);
  img->l1 = l1;
  img->l1_size = sn->l1_size;
  img->l1_offset = sn->l1_offset;
  img->size = sn->disk_size;
  img->snapshot = sn->name;
  img->readonly = true;
  return 0;
}
