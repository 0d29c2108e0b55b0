/* nbdkit-qcow2: compressed clusters (deflate and zstd).
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Each thread keeps its own decompression context, so nbdkit's worker
 * threads decompress in parallel without a lock or a per-call setup.
 */

#include <config.h>

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "qcow2-internal.h"

void
q2_cdesc_decode (unsigned cluster_bits, uint64_t desc, uint64_t *host,
                 uint64_t *len)
{
  unsigned x = 62 - (cluster_bits - 8);
  uint64_t sectors = ((desc & ((UINT64_C (1) << 62) - 1)) >> x) + 1;

  *host = desc & ((UINT64_C (1) << x) - 1);
  *len = sectors * 512 - (*host & 511);
}

static pthread_key_t zlib_key, zstd_key, scratch_key[3];
static pthread_once_t keys_once = PTHREAD_ONCE_INIT;

static void
free_zlib (void *p)
{
  inflateEnd (p);
  free (p);
}

static void
free_zstd (void *p)
{
  ZSTD_freeDCtx (p);
}

struct scratch {
  size_t size;
  unsigned char data[];
};

static void
make_keys (void)
{
  pthread_key_create (&zlib_key, free_zlib);
  pthread_key_create (&zstd_key, free_zstd);
  pthread_key_create (&scratch_key[0], free);
  pthread_key_create (&scratch_key[1], free);
  pthread_key_create (&scratch_key[2], free);
}

/* Per-thread buffers for compressed data: cluster-sized mallocs would
 * cross glibc's mmap threshold and fault in fresh pages every time.
 */
void *
q2_scratch (unsigned which, size_t n)
{
  struct scratch *s;

  pthread_once (&keys_once, make_keys);
  s = pthread_getspecific (scratch_key[which]);
  if (s && s->size >= n)
    return s->data;
  free (s);
  s = malloc (sizeof *s + n);
  pthread_setspecific (scratch_key[which], s);
  if (s == NULL) {
    errno = ENOMEM;
    return NULL;
  }
  s->size = n;
  return s->data;
}

static z_stream *
thread_zlib (void)
{
  z_stream *z;

  pthread_once (&keys_once, make_keys);
  z = pthread_getspecific (zlib_key);
  if (z)
    return inflateReset (z) == Z_OK ? z : NULL;
  z = calloc (1, sizeof *z);
  if (z == NULL || inflateInit2 (z, -12) != Z_OK) {  /* raw deflate */
    free (z);
    return NULL;
  }
  pthread_setspecific (zlib_key, z);
  return z;
}

static ZSTD_DCtx *
thread_zstd (void)
{
  ZSTD_DCtx *d;

  pthread_once (&keys_once, make_keys);
  d = pthread_getspecific (zstd_key);
  if (d) {
    ZSTD_DCtx_reset (d, ZSTD_reset_session_only);
    return d;
  }
  d = ZSTD_createDCtx ();
  if (d)
    pthread_setspecific (zstd_key, d);
  return d;
}

/* The cluster is good once the output is full; trailing input is the
 * padding of the last sector.
 */
static int
inflate_cluster (const void *src, size_t srclen, void *dst, size_t dstlen)
{
  z_stream *z = thread_zlib ();
  int r;

  if (z == NULL)
    return Q2_FAIL (ENOMEM, "zlib: cannot create an inflate stream");
  z->next_in = (Bytef *) src;
  z->avail_in = srclen;
  z->next_out = dst;
  z->avail_out = dstlen;
  r = inflate (z, Z_FINISH);
  if ((r == Z_STREAM_END || r == Z_BUF_ERROR || r == Z_OK) && z->avail_out == 0)
    return 0;
  errno = EIO;
  return -1;
}

static int
unzstd_cluster (const void *src, size_t srclen, void *dst, size_t dstlen)
{
  ZSTD_DCtx *d = thread_zstd ();
  ZSTD_inBuffer in = { src, srclen, 0 };
  ZSTD_outBuffer out = { dst, dstlen, 0 };

  if (d == NULL)
    return Q2_FAIL (ENOMEM, "zstd: cannot create a decompression context");
  while (out.pos < out.size) {
    size_t r = ZSTD_decompressStream (d, &out, &in);
    if (ZSTD_isError (r) || (out.pos < out.size && in.pos == in.size)) {
      errno = EIO;
      return -1;
    }
  }
  return 0;
}

/* Returns -1 with errno = EIO (and no message: the caller names the
 * cluster) if the data does not decompress to exactly dstlen bytes.
 */
int
q2_decompress (int type, const void *src, size_t srclen, void *dst,
               size_t dstlen)
{
  switch (type) {
  case QCOW2_COMPRESSION_DEFLATE:
    return inflate_cluster (src, srclen, dst, dstlen);
  case QCOW2_COMPRESSION_ZSTD:
    return unzstd_cluster (src, srclen, dst, dstlen);
  default:
    errno = ENOTSUP;
    return -1;
  }
}

/* ---- compressing (the compressed write path) ----
 * Per-thread compression contexts, like the decompression ones above.
 * The settings give output the size qemu-img's would be: deflate at
 * the default level with a 4 KiB window (raw, no zlib header) and
 * memLevel 9; zstd at its default level.
 */

static pthread_key_t deflate_key, zstdc_key;
static pthread_once_t ckeys_once = PTHREAD_ONCE_INIT;

static void
free_deflate (void *p)
{
  deflateEnd (p);
  free (p);
}

static void
free_zstdc (void *p)
{
  ZSTD_freeCCtx (p);
}

static void
make_ckeys (void)
{
  pthread_key_create (&deflate_key, free_deflate);
  pthread_key_create (&zstdc_key, free_zstdc);
}

static z_stream *
thread_deflate (void)
{
  z_stream *z;

  pthread_once (&ckeys_once, make_ckeys);
  z = pthread_getspecific (deflate_key);
  if (z)
    return deflateReset (z) == Z_OK ? z : NULL;
  z = calloc (1, sizeof *z);
  if (z == NULL ||
      deflateInit2 (z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
                    Z_DEFAULT_STRATEGY) != Z_OK) {
    free (z);
    return NULL;
  }
  pthread_setspecific (deflate_key, z);
  return z;
}

static ZSTD_CCtx *
thread_zstdc (void)
{
  ZSTD_CCtx *c;

  pthread_once (&ckeys_once, make_ckeys);
  c = pthread_getspecific (zstdc_key);
  if (c) {
    ZSTD_CCtx_reset (c, ZSTD_reset_session_only);
    return c;
  }
  c = ZSTD_createCCtx ();
  if (c)
    pthread_setspecific (zstdc_key, c);
  return c;
}

static int
deflate_cluster (const void *src, size_t srclen, void *dst, size_t dstcap,
                 size_t *outlen)
{
  z_stream *z = thread_deflate ();
  int r;

  if (z == NULL)
    return Q2_FAIL (ENOMEM, "zlib: cannot create a deflate stream");
  z->next_in = (Bytef *) src;
  z->avail_in = srclen;
  z->next_out = dst;
  z->avail_out = dstcap;
  r = deflate (z, Z_FINISH);
  if (r != Z_STREAM_END)
    return 1;                   /* does not fit: store it uncompressed */
  *outlen = dstcap - z->avail_out;
  return 0;
}

static int
zstd_cluster (const void *src, size_t srclen, void *dst, size_t dstcap,
              size_t *outlen)
{
  ZSTD_CCtx *c = thread_zstdc ();
  size_t r;

  if (c == NULL)
    return Q2_FAIL (ENOMEM, "zstd: cannot create a compression context");
  r = ZSTD_compressCCtx (c, dst, dstcap, src, srclen, ZSTD_CLEVEL_DEFAULT);
  if (ZSTD_isError (r)) {
    if (ZSTD_getErrorCode (r) == ZSTD_error_dstSize_tooSmall)
      return 1;
    return Q2_FAIL (EIO, "zstd: compression failed: %s",
                    ZSTD_getErrorName (r));
  }
  *outlen = r;
  return 0;
}

int
q2_compress (int type, const void *src, size_t srclen, void *dst,
             size_t dstcap, size_t *outlen)
{
  switch (type) {
  case QCOW2_COMPRESSION_DEFLATE:
    return deflate_cluster (src, srclen, dst, dstcap, outlen);
  case QCOW2_COMPRESSION_ZSTD:
    return zstd_cluster (src, srclen, dst, dstcap, outlen);
  default:
    return Q2_FAIL (ENOTSUP, "unknown compression type %d", type);
  }
}

uint64_t
q2_cdesc_encode (unsigned cluster_bits, uint64_t host, uint64_t len)
{
  unsigned x = 62 - (cluster_bits - 8);
  uint64_t extra = ((host + len - 1) >> 9) - (host >> 9);

  return QCOW_OFLAG_COMPRESSED | (extra << x) | host;
}
