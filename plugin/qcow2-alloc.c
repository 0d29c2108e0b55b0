/* nbdkit-qcow2: cluster allocation, deferred frees and overlap checks.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Crash-ordering rules enforced here:
 *  - a cluster whose last reference is removed is freed only after the
 *    removal has reached the disk: q2_free_later queues it, and the
 *    flush path applies the queue after writing back and syncing L2;
 *  - the queue is applied with every data request drained (io_lock
 *    held exclusive), so no request still reads or writes a cluster by
 *    the time it can be handed out again.
 *
 * The set of metadata clusters for overlap checks is in qcow2-meta.c.
 */

#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"
#include "qcow2-cache.h"

/* ---- allocation ---- */

/* The first run of free clusters at or after the hint, at most n long. */
static int
find_free (struct q2_image *img, uint64_t n, uint64_t *start, uint64_t *len)
{
  uint64_t c = img->free_hint, rc;

  for (; c < img->alloc_end; c++) {
    if (q2_rc_get (img, c, &rc) == -1)
      return -1;
    if (rc == 0)
      break;
  }
  img->free_hint = c;
  *start = c;
  for (*len = 1; *len < n && c + *len < img->alloc_end; ++*len) {
    if (q2_rc_get (img, c + *len, &rc) == -1)
      return -1;
    if (rc)
      break;
  }
  if (c + *len >= img->alloc_end)       /* past the end all is free */
    *len = n;
  return 0;
}

/* Refcount blocks for [start, start+len): adding one takes clusters,
 * so the caller searches again if this returns 1.
 */
static int
ensure_blocks (struct q2_image *img, uint64_t start, uint64_t len)
{
  uint64_t r;

  for (r = start >> img->rb_bits; r <= (start + len - 1) >> img->rb_bits; r++) {
    if (r < img->reftable_entries && img->reftable[r])
      continue;
    return q2_rc_add_block (img, r) == -1 ? -1 : 1;
  }
  return 0;
}

int
q2_alloc_clusters (struct q2_image *img, uint64_t n, uint64_t *host,
                   uint64_t *got)
{
  uint64_t start, len, c;
  int r;

  do {
    if (find_free (img, n, &start, &len) == -1)
      return -1;
    r = ensure_blocks (img, start, len);
    if (r == -1)
      return -1;
  } while (r == 1);
  for (c = start; c < start + len; c++)
    if (q2_rc_add (img, c, 1) == -1)
      return -1;
  if (img->free_hint == start)
    img->free_hint = start + len;
  *host = start << img->cluster_bits;
  *got = len;
  return q2_check_overlap (img, *host, len << img->cluster_bits);
}

int
q2_range_push (struct q2_image *img, struct q2_range **v, size_t *n,
               size_t *cap, uint64_t off, uint64_t len)
{
  if (*n == *cap) {
    size_t c = *cap ? *cap * 2 : 32;
    struct q2_range *p = realloc (*v, c * sizeof *p);

    if (p == NULL)
      return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
    *v = p;
    *cap = c;
  }
  (*v)[(*n)++] = (struct q2_range) { off, len };
  return 0;
}

int
q2_free_later (struct q2_image *img, uint64_t off, uint64_t len)
{
  return q2_range_push (img, &img->pending, &img->n_pending,
                        &img->cap_pending, off, len);
}

static void
dequeue (struct q2_image *img, size_t n)
{
  memmove (img->pending, img->pending + n,
           (img->n_pending - n) * sizeof *img->pending);
  img->n_pending -= n;
  img->pending_done += n;
}

int
q2_apply_frees (struct q2_image *img, uint64_t upto)
{
  size_t i, n = upto > img->pending_done ? upto - img->pending_done : 0;

  if (n > img->n_pending)
    n = img->n_pending;
  for (i = 0; i < n; i++) {
    if (q2_free_now (img, img->pending[i].off, img->pending[i].len) == -1) {
      dequeue (img, i + 1);     /* at worst the rest leak */
      return -1;
    }
  }
  dequeue (img, n);
  return 0;
}
