/* nbdkit-qcow2: open and close images.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Opening reads the header, the L1 table and the snapshot table, then
 * the data file and backing chain.  Nothing is written: an image opened
 * read-write is only modified by the first write request.
 */

#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>
#include <zstd.h>

#include "qcow2-internal.h"
#include "qcow2-nbd.h"
#include "qcow2-cache.h"
#include "qcow2-crypto.h"

/* Slices of 4 KiB keep a cache miss cheap for random I/O. */
#define L2_SLICE_SIZE 4096

static void
init_geometry (struct q2_image *img)
{
  img->cluster_bits = img->h.cluster_bits;
  img->cluster_size = UINT64_C (1) << img->cluster_bits;
  img->extl2 = img->h.incompat & QCOW2_INCOMPAT_EXTL2;
  img->l2e_size = img->extl2 ? 16 : 8;
  img->l2_bits = img->cluster_bits - (img->extl2 ? 4 : 3);
  img->subcluster_size =
    img->extl2 ? img->cluster_size / QCOW2_SUBCLUSTERS : img->cluster_size;
  img->size = img->h.size;
}

/* The budget, but never more than the L2 tables covering the disk. */
static int
make_l2_cache (struct q2_image *img, const struct q2_open_opts *opts)
{
  uint64_t budget = opts->l2_cache_bytes ? opts->l2_cache_bytes
                                         : Q2_DEFAULT_L2_CACHE;
  uint64_t span = UINT64_C (1) << (img->cluster_bits + img->l2_bits);
  uint64_t needed = (img->size / span + 1) * img->cluster_size;
  size_t slice = img->cluster_size < L2_SLICE_SIZE ? img->cluster_size
                                                   : L2_SLICE_SIZE;

  if (budget > needed)
    budget = needed;
  img->l2_cache = q2_cache_new (img->io, "L2", slice, budget / slice);
  if (img->l2_cache == NULL)
    return Q2_FAIL (ENOMEM, "%s: cannot allocate the L2 cache",
                    img->filename);
  return 0;
}

static struct q2_image *
new_image (struct q2_io *io)
{
  struct q2_image *img = calloc (1, sizeof *img);
  pthread_rwlockattr_t attr;

  if (img == NULL || (img->filename = strdup (io->name)) == NULL) {
    free (img);
    q2_error ("%s: calloc: %m", io->name);
    return NULL;
  }
  img->io = img->data_io = io;
  img->readonly = io->readonly;
  pthread_mutex_init (&img->lock, NULL);
  pthread_cond_init (&img->inflight_cond, NULL);
  pthread_rwlockattr_init (&attr);
  /* Writer preference: a flush waiting to release clusters must not
   * starve behind a stream of requests.
   */
  pthread_rwlockattr_setkind_np (&attr,
                                 PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  pthread_rwlock_init (&img->io_lock, &attr);
  pthread_rwlockattr_destroy (&attr);
  pthread_mutex_init (&img->rmw_lock, NULL);
  return img;
}

static int
read_header (struct q2_image *img)
{
  uint8_t small[QH_V3_MIN_LENGTH + 8] = { 0 };
  size_t smalllen = sizeof small;
  uint64_t cs = 0;
  uint8_t *buf;
  int64_t fs = q2_io_size (img->io);
  int r;

  if (fs == -1)
    return -1;
  img->file_size = fs;
  if ((uint64_t) fs < smalllen)
    smalllen = fs;
  if (q2_io_pread (img->io, small, smalllen, 0) == -1)
    return -1;
  if (q2_header_peek_cluster_size (small, smalllen, &cs) == -1) {
    /* Let the parser say what is wrong with the header. */
    if (q2_header_parse (img->filename, small, smalllen, fs, &img->h) == 0)
      q2_header_free (&img->h);
    return Q2_FAIL (EINVAL, "%s: not a usable qcow2 header", img->filename);
  }
  buf = malloc (cs);
  if (buf == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
  r = q2_io_pread (img->io, buf, cs, 0);
  if (r == 0)
    r = q2_header_parse (img->filename, buf, cs, fs, &img->h);
  free (buf);
  return r;
}

int
q2_open_qcow2 (struct q2_io *io, const struct q2_open_opts *opts,
               unsigned depth, struct q2_io **chain, bool follow,
               struct q2_image **img_out)
{
  struct q2_image *img = new_image (io);
  bool nbd_backing;

  if (img == NULL)
    return -1;
  if (read_header (img) == -1)
    goto fail;
  init_geometry (img);
  img->l1_size = img->h.l1_size;
  img->l1_offset = img->h.l1_offset;
  if (img->h.incompat & QCOW2_INCOMPAT_CORRUPT) {
    q2_error ("%s: warning: the image is marked corrupt; serving it "
              "read-only (repair with qemu-img check -r all)", img->filename);
    img->readonly = true;
  }
  if (q2_load_l1 (img, img->l1_offset, img->l1_size, &img->l1) == -1 ||
      make_l2_cache (img, opts) == -1 ||
      q2_snapshot_load_table (img) == -1 ||
      q2_crypt_open (img, opts, depth) == -1)
    goto fail;
  if (depth == 0 && opts->snapshot &&
      q2_snapshot_select (img, opts->snapshot) == -1)
    goto fail;
  if ((follow || (depth == 0 && opts->data_file)) &&
      q2_open_data_file (img, opts, depth) == -1)
    goto fail;
  if (!follow && (img->h.incompat & QCOW2_INCOMPAT_DATA_FILE) &&
      img->data_io == img->io) {
    q2_error ("%s: the image keeps its data in an external file; name it "
              "with %sdata-file=", img->filename, Q2_PREFIX (opts));
    errno = ENOTSUP;
    goto fail;
  }
  /* An NBD name means the same on every machine: the filter follows it
   * too, under the allow-remote-backing policy (q2_open_backing).
   */
  nbd_backing = img->h.backing_name && q2_nbd_is_name (img->h.backing_name);
  if (!follow && depth == 0 && opts->explicit_backing && !opts->backing &&
      img->h.backing_name && !nbd_backing) {
    q2_error ("%s: the image names the backing file '%s', which is not "
              "followed; give %sbacking=PATH (or %sbacking=none to read "
              "without it)", img->filename, img->h.backing_name,
              Q2_PREFIX (opts), Q2_PREFIX (opts));
    errno = ENOTSUP;
    goto fail;
  }
  if ((follow || (depth == 0 && opts->backing) ||
       (depth == 0 && opts->explicit_backing && nbd_backing)) &&
      q2_open_backing (img, opts, depth, chain) == -1)
    goto fail;
  if (depth == 0 && q2_compress_setup (img, opts) == -1)
    goto fail;
  if (depth == 0) {
    img->repair = opts->repair;
    q2_check_at_open (img);
  }
  *img_out = img;
  return 0;

 fail:
  img->io = NULL;               /* the caller still owns io on failure */
  if (img->data_io == io)
    img->data_io = NULL;
  q2_close (img);
  return -1;
}

int
q2_open_raw (struct q2_io *io, struct q2_image **img_out)
{
  struct q2_image *img = new_image (io);
  int64_t fs;

  if (img == NULL)
    return -1;
  fs = q2_io_size (io);
  if (fs == -1) {
    img->io = img->data_io = NULL;
    q2_close (img);
    return -1;
  }
  img->raw = true;
  img->readonly = true;
  img->size = img->file_size = fs;
  *img_out = img;
  return 0;
}

int
q2_open (const char *filename, const struct q2_open_opts *opts,
         struct q2_image **img_out)
{
  struct q2_io *chain[Q2_MAX_CHAIN];
  struct q2_io *io;
  bool ro = opts->readonly || opts->snapshot;

  io = q2_io_file_open (filename, ro);
  if (io == NULL && !ro && (errno == EACCES || errno == EROFS)) {
    q2_debug ("%s: cannot open read-write, falling back to read-only",
              filename);
    io = q2_io_file_open (filename, true);
  }
  if (io == NULL)
    return -1;
  chain[0] = io;
  if (q2_open_qcow2 (io, opts, 0, chain, true, img_out) == -1) {
    q2_io_close (io);
    return -1;
  }
  return 0;
}

int
q2_open_io (struct q2_io *io, const struct q2_open_opts *opts,
            struct q2_image **img_out)
{
  struct q2_io *chain[Q2_MAX_CHAIN] = { io };

  return q2_open_qcow2 (io, opts, 0, chain, false, img_out);
}

void
q2_close (struct q2_image *img)
{
  if (img == NULL)
    return;
  if (img->write_started)
    q2_finish_writes (img);
  q2_close (img->backing);
  if (img->data_io != img->io)
    q2_io_close (img->data_io);
  q2_io_close (img->io);
  q2_cache_free (img->l2_cache);
  q2_rc_free (img);
  q2_meta_free (img);
  free (img->pending);
  free (img->inflight);
  q2_snapshot_free_table (img);
  q2_header_free (&img->h);
  pthread_mutex_destroy (&img->lock);
  pthread_cond_destroy (&img->inflight_cond);
  pthread_rwlock_destroy (&img->io_lock);
  pthread_mutex_destroy (&img->rmw_lock);
  q2_crypt_close (img);
  free (img->l1);
  free (img->filename);
  free (img);
}

uint64_t
q2_size (const struct q2_image *img)
{
  return img->size;
}

bool
q2_is_writable (const struct q2_image *img)
{
  return !img->readonly && !img->corrupt && !img->check_failed;
}

void
q2_log_stats (struct q2_image *img)
{
  uint64_t h, m, w;

  for (; img; img = img->backing) {
    if (img->l2_cache) {
      q2_cache_stats (img->l2_cache, &h, &m, &w);
      q2_debug ("%s: L2 cache: %" PRIu64 " hits, %" PRIu64 " misses, %"
                PRIu64 " write-backs", img->filename, h, m, w);
    }
    if (img->rc_cache) {
      q2_cache_stats (img->rc_cache, &h, &m, &w);
      q2_debug ("%s: refcount cache: %" PRIu64 " hits, %" PRIu64 " misses, %"
                PRIu64 " write-backs", img->filename, h, m, w);
    }
  }
}

uint64_t
q2_cluster_size (const struct q2_image *img)
{
  return img->cluster_size;
}

const char *
q2_filename (const struct q2_image *img)
{
  return img->filename;
}

const char *
q2_features (void)
{
  return "qcow2_versions=2,3\n"
    "qcow2_compression_deflate=yes\n"
    "qcow2_compression_zstd=yes\n"
    "qcow2_extended_l2=yes\n"
    "qcow2_external_data_file=yes\n"
    "qcow2_backing_formats=raw,qcow2\n"
    "qcow2_backing_nbd=yes\n"
    "qcow2_max_chain=32\n"
    "qcow2_snapshots=read,create,apply,delete\n"
    "qcow2_encryption=aes,luks\n"
    "qcow2_luks_ciphers=" Q2_CRYPTO_CIPHERS "\n"
    "qcow2_luks_modes=" Q2_CRYPTO_MODES "\n"
    "qcow2_luks_ivgens=" Q2_CRYPTO_IVGENS "\n"
    "qcow2_luks_hashes=" Q2_CRYPTO_HASHES "\n"
    "qcow2_write=yes\n"
    "qcow2_compressed_writes=yes\n"
    "zstd_version=" ZSTD_VERSION_STRING "\n"
    "zlib_version=" ZLIB_VERSION;
}
