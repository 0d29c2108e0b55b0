/* nbdkit-qcow2: the low-level access to an image's own file that the
 * open, refcount, allocation and write paths all share.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Kept below every other file of the layer that writes (it calls only
 * the I/O interface), so that none of them depends on the write path.
 */

#include <config.h>

#include <errno.h>
#include <stdlib.h>

#include "qcow2-internal.h"

/* The file size is a high-water mark of everything ever written: past
 * it, clusters have never held data (see fresh_zeros).  A failed write
 * raises it too, because a full disk may take part of a write first.
 */
int
q2_write_file (struct q2_image *img, const void *buf, size_t n, uint64_t off)
{
  uint64_t end = off + n, cur;
  int r = img->io->ops->pwrite (img->io, buf, n, off);
  int saved_errno = errno;

  cur = __atomic_load_n (&img->file_size, __ATOMIC_ACQUIRE);
  while (end > cur &&
         !__atomic_compare_exchange_n (&img->file_size, &cur, end, false,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
    ;
  errno = saved_errno;
  return r;
}

int
q2_write_header_u64 (struct q2_image *img, unsigned field, uint64_t v)
{
  uint8_t b[8];

  put_be64 (b, v);
  return q2_write_file (img, b, 8, field);
}

/* Stop writing for good; best effort to record it in the header. */
int
q2_mark_corrupt (struct q2_image *img)
{
  if (img->corrupt)
    return 0;
  img->corrupt = true;
  if (img->h.version < 3)
    return 0;
  img->h.incompat |= QCOW2_INCOMPAT_CORRUPT;
  if (q2_write_header_u64 (img, QH_INCOMPAT, img->h.incompat) == 0)
    img->io->ops->flush (img->io);
  return 0;
}

int
q2_load_l1 (struct q2_image *img, uint64_t offset, uint32_t size,
            uint64_t **l1_out)
{
  uint64_t *l1 = malloc ((size ? size : 1) * sizeof *l1);
  uint32_t i;

  if (l1 == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc L1 table: %m", img->filename);
  if (size && q2_io_pread (img->io, l1, (size_t) size * 8, offset) == -1) {
    free (l1);
    return -1;
  }
  for (i = 0; i < size; i++)
    l1[i] = be64toh (l1[i]);
  *l1_out = l1;
  return 0;
}
