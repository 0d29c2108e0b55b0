/* nbdkit-qcow2: compressed writes (compress=true).
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Every write becomes whole compressed clusters.  A request is cut into
 * batches of whole guest clusters; for each batch:
 *
 *  1. the guest clusters are claimed in the in-flight list, so that
 *     concurrent writers (and zeroing, trimming) of a cluster wait;
 *  2. the edge clusters a request covers only partly are read back
 *     (read-modify-write) and the new data is laid over them;
 *  3. each cluster is compressed on the calling thread, with no lock
 *     held, so nbdkit's worker threads compress in parallel; a cluster
 *     that does not shrink is kept as it is;
 *  4. under the lock, host space is reserved: compressed clusters are
 *     packed back to back, byte by byte, into a packing area (as
 *     qemu-img does), uncompressed ones get a cluster each;
 *  5. the data is written, host-contiguous pieces in one pwrite;
 *  6. under the lock, the L2 entries are pointed at the new data and
 *     the old clusters (or compressed pieces) are released.
 *
 * Refcounts: a host cluster holding compressed data has one reference
 * per compressed cluster that touches it (a piece may run over into
 * the next host cluster, which it then references too), so a cluster
 * is free again once its last piece is released.  Pieces are only ever
 * appended to the packing area, never put into space freed inside it;
 * when the last cluster of the area is freed (q2_free_now), the area
 * is forgotten.  A cluster takes no more pieces once its refcount is at
 * the maximum (so with 1-bit refcounts every piece has its own).
 *
 * Crash ordering is that of every other write (see qcow2-write.c):
 * refcount increases and the data reach the disk before the L2 entry
 * (the L2 cache depends on the refcount cache, whose flush syncs the
 * file), and the old space is released with q2_free_later, only once
 * the new entry is on disk.  Packed space is never reused in place: a
 * host cluster is reused only after its refcount has dropped to zero.
 */

#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"
#include "qcow2-cache.h"

#define ALL_SUBCLUSTERS UINT64_C (0xffffffff)

/* Guest bytes compressed per batch (at least one cluster). */
#define BATCH_BYTES (2 * 1024 * 1024)

int
q2_compress_setup (struct q2_image *img, const struct q2_open_opts *opts)
{
  if (!opts->compress)
    return 0;
  if (img->h.crypt_method != QCOW2_CRYPT_NONE)
    return Q2_FAIL (ENOTSUP, "%s: compress=true cannot be used with an "
                    "encrypted image (qcow2 has no encrypted compressed "
                    "clusters; qemu refuses this too)", img->filename);
  if (img->data_io != img->io ||
      (img->h.incompat & QCOW2_INCOMPAT_DATA_FILE))
    return Q2_FAIL (ENOTSUP, "%s: compress=true cannot be used with an "
                    "external data file (qcow2 has no compressed clusters "
                    "there)", img->filename);
  if (img->h.compression_type != QCOW2_COMPRESSION_DEFLATE &&
      img->h.compression_type != QCOW2_COMPRESSION_ZSTD)
    return Q2_FAIL (ENOTSUP, "%s: compress=true: unknown compression type "
                    "%u in the header", img->filename,
                    img->h.compression_type);
  img->compress = true;
  return 0;
}

static uint64_t
rc_max (const struct q2_image *img)
{
  return img->refcount_bits >= 64 ? UINT64_MAX
                                  : (UINT64_C (1) << img->refcount_bits) - 1;
}

/* ---- host space (lock held) ---- */

/* Take the free cluster at off for the packing area, if it can be had
 * without moving anything: it must have refcount 0 and a refcount
 * block already.  Returns 1 if taken (refcount now 1), 0 if not.
 */
static int
claim_next (struct q2_image *img, uint64_t off)
{
  uint64_t c = off >> img->cluster_bits, r = c >> img->rb_bits, rc;

  if (r >= img->reftable_entries || img->reftable[r] == 0)
    return 0;
  if (q2_rc_get (img, c, &rc) == -1)
    return -1;
  if (rc != 0)
    return 0;
  if (q2_rc_add (img, c, 1) == -1)
    return -1;
  if (q2_check_overlap (img, off, img->cluster_size) == -1) {
    q2_rc_add (img, c, -1);
    return -1;
  }
  if (img->free_hint == c)
    img->free_hint = c + 1;
  return 1;
}

/* Reserve len (< cluster size) bytes for a compressed cluster: at the
 * end of the packing area if it fits, else running over into the next
 * host cluster if that one is free, else at the start of a newly
 * allocated cluster.  Every host cluster the piece touches gets one
 * reference.
 */
static int
alloc_piece (struct q2_image *img, uint64_t len, uint64_t *host)
{
  uint64_t cs = img->cluster_size, max = rc_max (img);
  uint64_t last = img->cpack_end - cs, rc = 0, n, got, start;
  bool has_area = img->cpack_end != 0, straddle;
  int r;

  if (has_area) {
    if (q2_rc_get (img, last >> img->cluster_bits, &rc) == -1)
      return -1;
    if (img->cpack_end - img->cpack_off >= len && rc < max) {
      if (q2_rc_add (img, last >> img->cluster_bits, 1) == -1)
        return -1;
      *host = img->cpack_off;
      img->cpack_off += len;
      return 0;
    }
  }

  /* A new cluster (refcount 1, for this piece): right after the area
   * if that one is free and nothing below it is (freed space is used
   * first, so that rewrites do not grow the file), else wherever the
   * allocator finds one.
   */
  r = has_area && img->free_hint >= img->cpack_end >> img->cluster_bits
      ? claim_next (img, img->cpack_end) : 0;
  if (r == -1)
    return -1;
  if (r == 1)
    n = img->cpack_end;
  else if (q2_alloc_clusters (img, 1, &n, &got) == -1)
    return -1;
  straddle = has_area && n == img->cpack_end &&
             img->cpack_off < img->cpack_end && rc < max;
  start = straddle ? img->cpack_off : n;
  if (straddle && q2_rc_add (img, last >> img->cluster_bits, 1) == -1) {
    q2_free_now (img, n, cs);
    return -1;
  }
  img->cpack_off = start + len;
  img->cpack_end = n + cs;
  *host = start;
  return 0;
}

/* ---- one batch ---- */

struct unit {
  uint64_t g;                   /* guest offset of the cluster */
  const uint8_t *data;          /* its new content, a whole cluster */
  uint8_t *out;                 /* compressed; NULL: store data as is */
  size_t clen;
  uint64_t host;                /* where it goes */
};

static uint64_t
unit_len (const struct q2_image *img, const struct unit *u)
{
  return u->out ? u->clen : img->cluster_size;
}

/* Lock held: reserve host space for every unit. */
static int
place (struct q2_image *img, struct unit *u, size_t n)
{
  size_t i;
  uint64_t got;

  for (i = 0; i < n; i++) {
    int r = u[i].out ? alloc_piece (img, u[i].clen, &u[i].host)
                     : q2_alloc_clusters (img, 1, &u[i].host, &got);
    if (r == -1) {
      while (i-- > 0)
        q2_free_now (img, u[i].host, unit_len (img, &u[i]));
      return -1;
    }
  }
  return 0;
}

/* Write the data, merging pieces that follow each other on the host.
 * Compressed pieces sit at i * cluster size in the output buffer and
 * are moved down to follow the previous piece of their run.
 */
static int
write_units (struct q2_image *img, struct unit *u, size_t n)
{
  uint8_t *run = NULL;
  uint64_t run_host = 0, run_len = 0;
  size_t i;

  for (i = 0; i < n; i++) {
    if (u[i].out == NULL) {
      if (q2_write_file (img, u[i].data, img->cluster_size, u[i].host) == -1)
        return -1;
      continue;
    }
    if (run && run_host + run_len == u[i].host) {
      memmove (run + run_len, u[i].out, u[i].clen);
      run_len += u[i].clen;
      continue;
    }
    if (run && q2_write_file (img, run, run_len, run_host) == -1)
      return -1;
    run = u[i].out;
    run_host = u[i].host;
    run_len = u[i].clen;
  }
  if (run && q2_write_file (img, run, run_len, run_host) == -1)
    return -1;
  return 0;
}

/* Lock held: drop the reference an old L2 entry held, once the new one
 * is on disk.
 */
static int
release_old (struct q2_image *img, uint64_t e)
{
  uint64_t host, len;

  if (e & QCOW_OFLAG_COMPRESSED) {
    q2_cdesc_decode (img->cluster_bits,
                     e & ~(QCOW_OFLAG_COPIED | QCOW_OFLAG_COMPRESSED),
                     &host, &len);
    return q2_free_later (img, host, len);
  }
  host = e & L2E_OFFSET_MASK;
  if (host)
    return q2_free_later (img, host, img->cluster_size);
  return 0;
}

/* Lock held: point the L2 entries at the new data.  Returns how many
 * were linked in *done.
 */
static int
link_units (struct q2_image *img, const struct unit *u, size_t n,
            size_t *done)
{
  for (*done = 0; *done < n; ++*done) {
    const struct unit *x = &u[*done];
    uint64_t l2_off, idx, e, bitmap;
    uint8_t b[16];

    idx = (x->g >> img->cluster_bits) & ((UINT64_C (1) << img->l2_bits) - 1);
    if (q2_ensure_l2 (img, x->g, &l2_off) == -1 ||
        q2_cache_read (img->l2_cache, l2_off + idx * img->l2e_size, b,
                       img->l2e_size) == -1)
      return -1;
    e = get_be64 (b);
    if (x->out) {
      if (q2_write_l2_entry (img, l2_off, idx,
                             q2_cdesc_encode (img->cluster_bits, x->host,
                                              x->clen), 0) == -1)
        return -1;
    }
    else {
      bitmap = img->extl2 ? ALL_SUBCLUSTERS : 0;
      if (q2_write_l2_entry (img, l2_off, idx, x->host | QCOW_OFLAG_COPIED,
                             bitmap) == -1)
        return -1;
    }
    if (release_old (img, e) == -1) {
      ++*done;
      return -1;
    }
  }
  return 0;
}

/* The current content of the cluster at g (zeros past the end). */
static int
read_old (struct q2_image *img, uint8_t *dst, uint64_t g)
{
  uint64_t len = img->cluster_size;

  if (len > img->size - g)
    len = img->size - g;
  memset (dst + len, 0, img->cluster_size - len);
  return q2_read_nolock (img, dst, len, g);
}

/* The entries of [g, end) must be sound before their old space is
 * released: q2_map checks them (and on damage flags the image, so that
 * the write path stops writing).
 */
static int
check_entries (struct q2_image *img, uint64_t g, uint64_t end)
{
  while (g < end) {
    struct q2_run run;

    if (q2_map (img, g, end - g, &run) == -1)
      return -1;
    g += run.len;
  }
  return 0;
}

/* [offset, offset+count) lies inside n clusters from g0. */
static int
write_batch (struct q2_image *img, const uint8_t *buf, uint64_t count,
             uint64_t offset, uint64_t g0, size_t n)
{
  uint64_t cs = img->cluster_size, end = offset + count;
  uint64_t gend = g0 + n * cs;
  bool aligned = offset == g0 && end == gend;
  uint8_t *raw = NULL, *cbuf;
  struct unit *u;
  size_t i, done = 0;
  int r;

  cbuf = malloc (n * cs);
  u = calloc (n, sizeof *u);
  if (!aligned)
    raw = malloc (n * cs);
  if (cbuf == NULL || u == NULL || (!aligned && raw == NULL)) {
    free (cbuf);
    free (u);
    free (raw);
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
  }

  pthread_mutex_lock (&img->lock);
  r = q2_inflight_claim (img, g0, gend - g0);
  pthread_mutex_unlock (&img->lock);
  if (r == -1)
    goto out_free;

  if (check_entries (img, g0, gend) == -1) {
    r = -1;
    goto out_release;
  }

  /* Read-modify-write of the clusters covered in part. */
  if (!aligned) {
    bool head = offset > g0, tail = end < gend;

    if (head || (tail && n == 1))
      r = read_old (img, raw, g0);
    if (r == 0 && tail && n > 1)
      r = read_old (img, raw + (n - 1) * cs, gend - cs);
    if (r == -1)
      goto out_release;
    memcpy (raw + (offset - g0), buf, count);
  }

  /* Compress, no lock held. */
  for (i = 0; i < n; i++) {
    u[i].g = g0 + i * cs;
    u[i].data = (aligned ? buf : raw) + i * cs;
    u[i].out = cbuf + i * cs;
    r = q2_compress (img->h.compression_type, u[i].data, cs, u[i].out,
                     cs - 1, &u[i].clen);
    if (r == -1)
      goto out_release;
    if (r == 1)
      u[i].out = NULL;          /* does not shrink: store it as it is */
  }

  pthread_mutex_lock (&img->lock);
  r = place (img, u, n);
  pthread_mutex_unlock (&img->lock);
  if (r == -1)
    goto out_release;

  r = write_units (img, u, n);

  pthread_mutex_lock (&img->lock);
  if (r == 0)
    r = link_units (img, u, n, &done);
  for (i = done; i < n; i++)
    q2_free_now (img, u[i].host, unit_len (img, &u[i]));
  q2_inflight_release (img, g0);
  pthread_mutex_unlock (&img->lock);
  goto out_free;

 out_release:
  pthread_mutex_lock (&img->lock);
  q2_inflight_release (img, g0);
  pthread_mutex_unlock (&img->lock);
 out_free:
  free (cbuf);
  free (u);
  free (raw);
  return r;
}

int
q2_write_compressed (struct q2_image *img, const uint8_t *buf,
                     uint64_t count, uint64_t offset)
{
  uint64_t cs = img->cluster_size;
  uint64_t batch = BATCH_BYTES > cs ? BATCH_BYTES / cs : 1;

  while (count > 0) {
    uint64_t g0 = offset & ~(cs - 1);
    uint64_t lim = g0 + batch * cs, n;

    if (lim > offset + count)
      lim = offset + count;
    n = (lim - g0 + cs - 1) / cs;
    if (write_batch (img, buf, lim - offset, offset, g0, n) == -1)
      return -1;
    buf += lim - offset;
    count -= lim - offset;
    offset = lim;
  }
  return 0;
}
