/* nbdkit-qcow2: reading guest data and reporting block status.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Reads walk the mapping run by run.  Host-contiguous data runs are
 * merged into one pread, even across L2 slices and tables.  No lock is
 * held here: the mapping copies what it needs out of the cache.
 */

#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"

/* Bytes of the backing image from offset: what lies past its end reads
 * as zeros.
 */
static int
read_backing (struct q2_image *img, uint8_t *buf, uint64_t len,
              uint64_t offset)
{
  struct q2_image *b = img->backing;
  uint64_t avail = 0;

  if (b && offset < b->size)
    avail = b->size - offset < len ? b->size - offset : len;
  if (avail && q2_read (b, buf, avail, offset) == -1)
    return -1;
  memset (buf + avail, 0, len - avail);
  return 0;
}

/* Compressed clusters that lie next to each other on the host are read
 * with one pread, up to these limits.
 */
#define CBATCH_CLUSTERS 32
#define CBATCH_BYTES (1024 * 1024)

struct cpiece {
  uint8_t *buf;                 /* destination */
  uint64_t len, in;             /* bytes wanted, from offset in cluster */
  uint64_t host, clen;
};

static int
decompress_piece (struct q2_image *img, const struct cpiece *c,
                  const uint8_t *src, uint64_t guest)
{
  bool whole = c->len == img->cluster_size;
  uint8_t *out = whole ? c->buf : q2_scratch (1, img->cluster_size);

  if (out == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
  if (q2_decompress (img->h.compression_type, src, c->clen, out,
                     img->cluster_size) == -1)
    return Q2_FAIL (EIO, "%s: compressed cluster at host offset 0x%" PRIx64
                    " (guest offset %" PRIu64 ") does not decompress",
                    img->filename, c->host, guest - c->in);
  if (!whole)
    memcpy (c->buf, out + c->in, c->len);
  return 0;
}

/* Read and decompress the compressed run at offset and any compressed
 * clusters after it that are adjacent on the host.  Sets *done.
 */
static int
read_compressed (struct q2_image *img, uint8_t *buf, uint64_t count,
                 uint64_t offset, const struct q2_run *first, uint64_t *done)
{
  struct cpiece c[CBATCH_CLUSTERS];
  struct q2_run run = *first;
  uint64_t lo = 0, hi = 0, i, n = 0;
  uint8_t *src;

  *done = 0;
  for (;;) {
    struct cpiece *p = &c[n];

    q2_cdesc_decode (img->cluster_bits, run.cdesc, &p->host, &p->clen);
    if (n > 0 && (p->host < lo || p->host > hi ||
                  p->host + p->clen - lo > CBATCH_BYTES))
      break;
    p->buf = buf + *done;
    p->len = run.len;
    p->in = (offset + *done) & (img->cluster_size - 1);
    if (n == 0)
      lo = p->host;
    if (p->host + p->clen > hi)
      hi = p->host + p->clen;
    *done += run.len;
    if (++n == CBATCH_CLUSTERS || *done == count ||
        q2_map (img, offset + *done, count - *done, &run) == -1 ||
        run.kind != Q2_COMPRESSED)
      break;
  }
  src = q2_scratch (0, hi - lo);
  if (src == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
  if (q2_io_pread (img->io, src, hi - lo, lo) == -1)
    return -1;
  for (i = 0; i < n; i++)
    if (decompress_piece (img, &c[i], src + (c[i].host - lo),
                          offset + (c[i].buf - buf)) == -1)
      return -1;
  return 0;
}

/* A pending host read, grown while runs stay contiguous on the host. */
struct pending {
  uint8_t *buf;
  uint64_t host, len;
  uint64_t guest;               /* of the first byte, for decryption */
};

static int
issue (struct q2_image *img, struct pending *p)
{
  int r = 0;

  if (p->len) {
    r = q2_io_pread (img->data_io, p->buf, p->len, p->host);
    if (r == 0 && img->crypt)
      q2_crypt_decrypt (img, p->buf, p->len, p->host, p->guest);
  }
  p->len = 0;
  return r;
}

static int read_sectors (struct q2_image *img, uint8_t *b, uint64_t count,
                         uint64_t offset);

/* Encrypted images decrypt whole sectors: a partial sector at either
 * end is read into a buffer of its own.
 */
static int
read_partial (struct q2_image *img, uint8_t *b, uint64_t count,
              uint64_t offset)
{
  uint8_t sec[Q2_SECTOR_SIZE];
  uint64_t s, in, n, mid;

  if (offset % Q2_SECTOR_SIZE) {
    s = offset & ~(uint64_t) (Q2_SECTOR_SIZE - 1);
    in = offset - s;
    n = Q2_SECTOR_SIZE - in < count ? Q2_SECTOR_SIZE - in : count;
    if (read_sectors (img, sec, Q2_SECTOR_SIZE, s) == -1)
      return -1;
    memcpy (b, sec + in, n);
    b += n;
    offset += n;
    count -= n;
  }
  mid = count & ~(uint64_t) (Q2_SECTOR_SIZE - 1);
  if (mid && read_sectors (img, b, mid, offset) == -1)
    return -1;
  if (count > mid) {
    if (read_sectors (img, sec, Q2_SECTOR_SIZE, offset + mid) == -1)
      return -1;
    memcpy (b + mid, sec, count - mid);
  }
  return 0;
}

int
q2_read (struct q2_image *img, void *buf, uint64_t count, uint64_t offset)
{
  int r;

  pthread_rwlock_rdlock (&img->io_lock);
  r = q2_read_nolock (img, buf, count, offset);
  pthread_rwlock_unlock (&img->io_lock);
  return r;
}

int
q2_read_nolock (struct q2_image *img, void *buf, uint64_t count,
                uint64_t offset)
{
  if (img->raw)
    return q2_io_pread (img->io, buf, count, offset);
  if (img->crypt && ((offset | count) % Q2_SECTOR_SIZE))
    return read_partial (img, buf, count, offset);
  return read_sectors (img, buf, count, offset);
}

static int
read_sectors (struct q2_image *img, uint8_t *buf, uint64_t count,
              uint64_t offset)
{
  struct pending p = { .len = 0 };
  uint8_t *b = buf;

  while (count > 0) {
    struct q2_run run;
    int r = 0;

    if (q2_map (img, offset, count, &run) == -1)
      return -1;
    if (run.kind == Q2_DATA && p.len && p.host + p.len == run.host) {
      p.len += run.len;
      goto next;
    }
    if (issue (img, &p) == -1)
      return -1;
    switch (run.kind) {
    case Q2_DATA:
      p = (struct pending) { b, run.host, run.len, offset };
      break;
    case Q2_ZERO:
      memset (b, 0, run.len);
      break;
    case Q2_UNALLOC:
      r = read_backing (img, b, run.len, offset);
      break;
    case Q2_COMPRESSED:
      if (img->crypt) {
        r = Q2_FAIL (EINVAL, "%s: compressed cluster in an encrypted image "
                     "(guest offset %" PRIu64 ")", img->filename, offset);
        break;
      }
      r = read_compressed (img, b, count, offset, &run, &run.len);
      break;
    }
    if (r == -1)
      return -1;
  next:
    b += run.len;
    offset += run.len;
    count -= run.len;
  }
  return issue (img, &p);
}

static int
raw_status (struct q2_image *img, uint64_t offset, uint64_t count,
            uint64_t *len, unsigned *flags)
{
  bool data = true;

  *len = count;
  if (offset >= img->size) {
    *flags = Q2_STATUS_HOLE | Q2_STATUS_ZERO;
    return 0;
  }
  if (*len > img->size - offset)
    *len = img->size - offset;
  if (img->io->ops->status)
    return img->io->ops->status (img->io, offset, *len, len, flags);
  if (img->io->ops->data_status &&
      img->io->ops->data_status (img->io, offset, *len, len, &data) == -1)
    return -1;
  *flags = data ? 0 : Q2_STATUS_HOLE | Q2_STATUS_ZERO;
  return 0;
}

int
q2_block_status (struct q2_image *img, uint64_t offset, uint64_t count,
                 uint64_t *len, unsigned *flags)
{
  struct q2_run run;

  if (img->raw)
    return raw_status (img, offset, count, len, flags);
  if (q2_map (img, offset, count, &run) == -1)
    return -1;
  *len = run.len;
  switch (run.kind) {
  case Q2_DATA:
  case Q2_COMPRESSED:
    *flags = 0;
    return 0;
  case Q2_ZERO:
    *flags = Q2_STATUS_HOLE | Q2_STATUS_ZERO;
    return 0;
  case Q2_UNALLOC:
    if (img->backing == NULL || offset >= img->backing->size) {
      *flags = Q2_STATUS_HOLE | Q2_STATUS_ZERO;
      return 0;
    }
    if (*len > img->backing->size - offset)
      *len = img->backing->size - offset;
    return q2_block_status (img->backing, offset, *len, len, flags);
  }
  return 0;
}
