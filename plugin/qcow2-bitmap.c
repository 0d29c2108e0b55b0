/* nbdkit-qcow2: persistent dirty bitmaps, as far as a writer that does
 * not track them must go.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Clearing the bitmaps autoclear bit would make QEMU ignore the bitmap
 * directory and leave its clusters leaked.  Instead, before the first
 * write, every bitmap is flagged in use, which is how QEMU marks a
 * bitmap that was not saved cleanly: it stays visible but is never
 * trusted, and qemu-img can remove it.
 */

#include <config.h>

#include <errno.h>
#include <stdlib.h>

#include "qcow2-internal.h"

static int
flag_entries (struct q2_image *img, uint8_t *dir, uint64_t size)
{
  uint64_t off = 0;
  uint32_t i;

  for (i = 0; i < img->h.nb_bitmaps; i++) {
    uint64_t len;

    if (size - off < QBM_FIXED_SIZE)
      return -1;
    len = QBM_FIXED_SIZE + (uint64_t) get_be32 (dir + off + QBM_EXTRA_SIZE)
          + get_be16 (dir + off + QBM_NAME_SIZE);
    len = (len + 7) & ~UINT64_C (7);
    if (len > size - off)
      return -1;
    put_be32 (dir + off + QBM_FLAGS,
              get_be32 (dir + off + QBM_FLAGS) | QBM_FLAG_IN_USE);
    off += len;
  }
  return 0;
}

int
q2_bitmaps_mark_in_use (struct q2_image *img)
{
  uint64_t size = img->h.bitmap_dir_size, off = img->h.bitmap_dir_offset;
  uint8_t *dir;
  int r = -1;

  if (img->h.nb_bitmaps == 0 || size == 0)
    return 0;
  if (size > QBM_MAX_DIR_BYTES || off % img->cluster_size ||
      off > img->file_size || size > img->file_size - off)
    return -1;                  /* damaged: let the caller drop the bit */
  dir = malloc (size);
  if (dir == NULL)
    return -1;
  if (q2_io_pread (img->io, dir, size, off) == 0 &&
      flag_entries (img, dir, size) == 0 &&
      q2_write_file (img, dir, size, off) == 0)
    r = 0;
  free (dir);
  return r;
}
