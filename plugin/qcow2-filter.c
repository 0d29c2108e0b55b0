/* nbdkit-qcow2: the nbdkit filter glue.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * The same mapping layer as the plugin, on top of whatever the plugin
 * below exports (a file, another NBD server, an xz archive ...).
 *
 * config (keys prefixed "qcow2-" are ours) -> after_fork opens one
 * shared context into the plugin and the one image this process
 * serves (or, if that fails, the next connection tries again) -> every
 * connection shares it through the thread-safe layer, so connections
 * open no plugin context of their own -> cleanup closes.
 *
 * Filters cannot learn of -r from nbdkit before the first connection;
 * q2_params_nbdkit_readonly reads it from the command line, and under
 * -r the shared context is opened read-only.  nbdkit refuses writes on
 * read-only connections with EROFS.
 */

#include <config.h>

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nbdkit-filter.h>

#include "qcow2-internal.h"
#include "qcow2-params.h"
#include "qcow2-glue.h"
#include "qcow2-nbd.h"

/* -D qcow2.map=1: log every mapping.  -D qcow2.cache=1: cache stats. */
NBDKIT_DLL_PUBLIC int qcow2_debug_map = 0;
NBDKIT_DLL_PUBLIC int qcow2_debug_cache = 0;
extern int q2_debug_map;

#define PREFIX "qcow2-"

/* Largest request we send down in one piece. */
#define MAX_REQUEST (32 * 1024 * 1024)

static struct q2_image *image;
static int thread_model;

/* ---- the layer's I/O interface over the plugin below ---- */

struct next_io {
  struct q2_io io;
  nbdkit_next *next;
  uint64_t size;                /* the plugin's export size (fixed) */
  uint32_t align;               /* the plugin's minimum block size */
  uint32_t max;                 /* largest request sent down */
  bool can_flush;
  bool can_extents;
  /* Taken around every call into the plugin when its thread model
   * does not allow requests from several connections at once (the
   * shared context serves them all).
   */
  bool serialize;
  pthread_mutex_t lock;
  /* Read-modify-write of a partial block when align > 1. */
  pthread_mutex_t rmw_lock;
};

static void
io_lock (struct next_io *n)
{
  if (n->serialize)
    pthread_mutex_lock (&n->lock);
}

static void
io_unlock (struct next_io *n)
{
  if (n->serialize)
    pthread_mutex_unlock (&n->lock);
}

/* One aligned piece, inside the export. */
static int
piece_pread (struct next_io *n, void *buf, uint32_t count, uint64_t off)
{
  int err = 0, r;

  io_lock (n);
  r = n->next->pread (n->next, buf, count, off, 0, &err);
  io_unlock (n);
  if (r == -1) {
    errno = err ? err : EIO;
    return Q2_FAIL (errno, "%s: read at offset %" PRIu64 ": %m",
                    n->io.name, off);
  }
  return 0;
}

static int
piece_pwrite (struct next_io *n, const void *buf, uint32_t count,
              uint64_t off)
{
  int err = 0, r;

  io_lock (n);
  r = n->next->pwrite (n->next, buf, count, off, 0, &err);
  io_unlock (n);
  if (r == -1) {
    errno = err ? err : EIO;
    return Q2_FAIL (errno, "%s: write at offset %" PRIu64 ": %m",
                    n->io.name, off);
  }
  return 0;
}

/* The next piece of a request at off with len bytes left (inside the
 * export): whole blocks, at most n->max bytes, when off is aligned and
 * a block is left; else the part of the block at off.
 */
struct piece {
  bool whole;
  uint32_t len;                 /* bytes of the request it covers */
  /* A partial block: where it starts, its length in the export
   * (shorter at the end of an export whose size is not a multiple of
   * the block size), and where off falls in it.
   */
  uint64_t block;
  uint32_t blen, head;
};

static void
next_piece (const struct next_io *n, uint64_t off, uint64_t len,
            struct piece *p)
{
  p->block = off & ~(uint64_t) (n->align - 1);
  p->head = off - p->block;
  p->whole = p->head == 0 && len >= n->align;
  if (p->whole) {
    p->len = len < n->max ? len : n->max;
    p->len &= ~(n->align - 1);
    p->blen = 0;
  }
  else {
    uint64_t want = n->align - p->head;

    p->blen = n->size - p->block < n->align ? n->size - p->block
                                             : n->align;
    p->len = want < len ? want : len;
  }
}

/* Read [off, off+len) of the export, which need not be aligned, into
 * buf.  The caller keeps the range inside the export.
 */
static int
export_read (struct next_io *n, char *buf, uint64_t len, uint64_t off)
{
  while (len > 0) {
    struct piece p;

    next_piece (n, off, len, &p);
    if (p.whole) {
      /* Aligned: read straight into buf. */
      if (piece_pread (n, buf, p.len, off) == -1)
        return -1;
    }
    else {
      /* A partial block: through a bounce buffer. */
      char *b = malloc (n->align);

      if (b == NULL)
        return Q2_FAIL (ENOMEM, "%s: malloc: %m", n->io.name);
      if (piece_pread (n, b, p.blen, p.block) == -1) {
        free (b);
        return -1;
      }
      memcpy (buf, b + p.head, p.len);
      free (b);
    }
    buf += p.len; off += p.len; len -= p.len;
  }
  return 0;
}

static int
next_pread (struct q2_io *io, void *buf, size_t len, uint64_t off)
{
  struct next_io *n = (struct next_io *) io;
  uint64_t inside = 0;

  /* Past the end of the export reads as zeros, as past a file's EOF. */
  if (off < n->size)
    inside = n->size - off < len ? n->size - off : len;
  if (inside < len)
    memset ((char *) buf + inside, 0, len - inside);
  return inside ? export_read (n, buf, inside, off) : 0;
}

static int
next_pwrite (struct q2_io *io, const void *buf, size_t len, uint64_t off)
{
  struct next_io *n = (struct next_io *) io;
  const char *p = buf;

  /* nbdkit plugins do not grow: clusters must fit in the export. */
  if (off > n->size || len > n->size - off)
    return Q2_FAIL (ENOSPC, "%s: write at offset %" PRIu64 " of %zu bytes "
                    "past the end of the export (%" PRIu64 " bytes): the "
                    "plugin below cannot grow; give the image room first",
                    io->name, off, len, n->size);
  while (len > 0) {
    struct piece pc;

    next_piece (n, off, len, &pc);
    if (pc.whole) {
      if (piece_pwrite (n, p, pc.len, off) == -1)
        return -1;
    }
    else {
      /* Read-modify-write of one block.  Partial blocks are rare (small
       * metadata updates); one lock keeps two of them from racing.
       */
      char *b = malloc (n->align);
      int r;

      if (b == NULL)
        return Q2_FAIL (ENOMEM, "%s: malloc: %m", io->name);
      pthread_mutex_lock (&n->rmw_lock);
      r = piece_pread (n, b, pc.blen, pc.block);
      if (r == 0) {
        memcpy (b + pc.head, p, pc.len);
        r = piece_pwrite (n, b, pc.blen, pc.block);
      }
      pthread_mutex_unlock (&n->rmw_lock);
      free (b);
      if (r == -1)
        return -1;
    }
    p += pc.len; off += pc.len; len -= pc.len;
  }
  return 0;
}

static int
next_flush (struct q2_io *io)
{
  struct next_io *n = (struct next_io *) io;
  int err = 0, r;

  if (!n->can_flush)
    return 0;                   /* nothing more can be done */
  io_lock (n);
  r = n->next->flush (n->next, 0, &err);
  io_unlock (n);
  if (r == -1) {
    errno = err ? err : EIO;
    return Q2_FAIL (errno, "%s: flush: %m", io->name);
  }
  return 0;
}

static int64_t
next_size (struct q2_io *io)
{
  struct next_io *n = (struct next_io *) io;

  return n->size;
}

/* The plugin's extents, where it has them. */
static int
next_data_status (struct q2_io *io, uint64_t off, uint64_t len,
                  uint64_t *run, bool *is_data)
{
  struct next_io *n = (struct next_io *) io;
  struct nbdkit_extents *exts;
  struct nbdkit_extent e;
  uint32_t count;
  int err = 0, r;

  *is_data = true;
  *run = len;
  if (off >= n->size) {
    *is_data = false;
    return 0;
  }
  if (!n->can_extents)
    return 0;
  count = n->size - off < len ? n->size - off : len;
  if (count > n->max)
    count = n->max;
  exts = nbdkit_extents_new (off, off + count);
  if (exts == NULL)
    return -1;
  io_lock (n);
  r = n->next->extents (n->next, count, off, NBDKIT_FLAG_REQ_ONE, exts, &err);
  io_unlock (n);
  if (r == 0 && nbdkit_extents_count (exts) > 0) {
    e = nbdkit_get_extent (exts, 0);
    if (e.offset <= off && e.offset + e.length > off) {
      *is_data = !(e.type & NBDKIT_EXTENT_ZERO);
      *run = e.offset + e.length - off < len ? e.offset + e.length - off : len;
    }
  }
  nbdkit_extents_free (exts);
  return 0;                     /* on failure: say data */
}

static void
next_close (struct q2_io *io)
{
  struct next_io *n = (struct next_io *) io;

  pthread_mutex_destroy (&n->lock);
  pthread_mutex_destroy (&n->rmw_lock);
}

static const struct q2_io_ops next_ops = {
  .pread = next_pread,
  .pwrite = next_pwrite,
  .flush = next_flush,
  .size = next_size,
  .data_status = next_data_status,
  .close = next_close,
};

static struct q2_io *
next_io_new (nbdkit_next *next, const char *name)
{
  struct next_io *n;
  uint32_t minimum = 0, preferred = 0, maximum = 0;
  int64_t size;
  int w, f, e;

  size = next->get_size (next);
  w = next->can_write (next);
  f = next->can_flush (next);
  e = next->can_extents (next);
  if (size == -1 || w == -1 || f == -1 || e == -1 ||
      next->block_size (next, &minimum, &preferred, &maximum) == -1)
    return NULL;
  n = calloc (1, sizeof *n);
  if (n == NULL || (n->io.name = strdup (name)) == NULL) {
    free (n);
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  n->io.ops = &next_ops;
  n->io.readonly = !w;
  n->io.fixed_size = true;
  n->next = next;
  n->size = size;
  n->align = minimum > 1 ? minimum : 1;
  n->max = MAX_REQUEST;
  if (maximum && maximum != (uint32_t) -1 && maximum < n->max)
    n->max = maximum;
  if (n->max < n->align)
    n->max = n->align;
  n->max &= ~(n->align - 1);
  n->can_flush = f;
  n->can_extents = e;
  n->serialize = thread_model < NBDKIT_THREAD_MODEL_PARALLEL;
  pthread_mutex_init (&n->lock, NULL);
  pthread_mutex_init (&n->rmw_lock, NULL);
  if (!w)
    nbdkit_debug ("qcow2: the plugin below is read-only: serving the image "
                  "read-only");
  nbdkit_debug ("qcow2: plugin export: %" PRIu64 " bytes, block size "
                "%" PRIu32 ", requests up to %" PRIu32 "%s",
                n->size, n->align, n->max,
                n->serialize ? ", serialized" : "");
  return &n->io;
}

/* ---- the filter ---- */

static nbdkit_next *shared;     /* one context into the plugin */

static void
qcow2_load (void)
{
  q2_glue_load ();
}

/* What messages call the image: the plugin's file, path, URL or
 * socket parameter as given (without any user:password@ in a URL).
 */
static char *image_name;

static void
qcow2_unload (void)
{
  q2_params_free ();
  free (image_name);
}

static void
note_image_name (const char *key, const char *value)
{
  static const char *const keys[] = { "file", "path", "url", "uri",
                                      "socket", NULL };
  const char *scheme, *at, *slash;
  size_t i;
  char *n;

  for (i = 0; keys[i]; i++)
    if (strcmp (key, keys[i]) == 0)
      break;
  if (keys[i] == NULL)
    return;
  n = strdup (value);
  if (n == NULL)
    return;
  scheme = strstr (n, "://");
  if (scheme) {
    at = strchr (scheme + 3, '@');
    slash = strchr (scheme + 3, '/');
    if (at && (slash == NULL || at < slash))
      memmove (n + (scheme + 3 - n), at + 1, strlen (at + 1) + 1);
  }
  free (image_name);
  image_name = n;
}

/* Our keys carry the prefix; everything else is the plugin's. */
static int
qcow2_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
              const char *key, const char *value)
{
  int r;

  if (strncmp (key, PREFIX, strlen (PREFIX)) != 0) {
    note_image_name (key, value);
    return next (nxdata, key, value);
  }
  r = q2_params_config (key + strlen (PREFIX), value);
  if (r == 1) {
    nbdkit_error ("unknown parameter '%s'", key);
    return -1;
  }
  /* The shared parser names the key without our prefix. */
  if (r == -1)
    nbdkit_error ("qcow2 filter: parameter '%s' rejected", key);
  return r;
}

static int
qcow2_config_complete (nbdkit_next_config_complete *next,
                       nbdkit_backend *nxdata)
{
  /* The image is the plugin's export, which the filter cannot create. */
  if (q2_params.create) {
    nbdkit_error ("%screate=true: the filter does not create images; "
                  "create the image first (nbdkit qcow2 create=true, or "
                  "qemu-img create) and export it", PREFIX);
    return -1;
  }
  q2_params.opts.param_prefix = PREFIX;   /* for messages */
  if (q2_params_complete () == -1)
    return -1;
  q2_params.opts.explicit_backing = true;
  return next (nxdata);
}

#define qcow2_config_help Q2_PARAMS_HELP (PREFIX)

static int
qcow2_get_ready (int model)
{
  thread_model = model;
  q2_debug_map = qcow2_debug_map;
  return 0;
}

/* Open the shared context and the image.  Called with open_lock held
 * (or before any connection).
 */
static pthread_mutex_t open_lock = PTHREAD_MUTEX_INITIALIZER;

static int
open_image (nbdkit_backend *backend)
{
  struct q2_io *io;
  bool ro = q2_params_nbdkit_readonly ();

  /* Under -r the plugin is opened read-only too. */
  shared = nbdkit_next_context_open (backend, ro, "", 1);
  if (shared == NULL && !ro) {
    nbdkit_debug ("qcow2: the plugin cannot be opened for writing; "
                  "trying read-only");
    shared = nbdkit_next_context_open (backend, 1, "", 1);
  }
  if (shared == NULL)
    return -1;
  if (shared->prepare (shared) == -1)
    goto fail;
  io = next_io_new (shared, image_name ? image_name : "the plugin's export");
  if (io == NULL)
    goto fail;
  if (q2_open_io (io, &q2_params.opts, &image) == -1) {
    q2_io_close (io);
    goto fail;
  }
  /* snapshot-create= and friends, before any client uses the image. */
  if (q2_params_snapshot_ops (image) == -1) {
    q2_close (image);           /* flushes what was done */
    image = NULL;
    goto fail;
  }
  return 0;

 fail:
  shared->finalize (shared);
  nbdkit_next_context_close (shared);
  shared = NULL;
  return -1;
}

/* Open the image once, before any connection, so that every connection
 * shares it.  nbdkit exits if .after_fork fails, but with --run the
 * command would then wait for ever on the socket, so a failure here
 * only leaves the image closed: every connection retries and fails
 * with the error.
 */
static int
qcow2_after_fork (nbdkit_backend *backend)
{
  q2_nbd_after_fork ();
  if (open_image (backend) == -1)
    nbdkit_debug ("qcow2: the image could not be opened; connections "
                  "will try again");
  return 0;
}
static void
qcow2_cleanup (nbdkit_backend *backend)
{
  if (qcow2_debug_cache && image)
    q2_log_stats (image);
  q2_close (image);             /* writes back and flushes */
  image = NULL;
  if (shared) {
    shared->finalize (shared);
    nbdkit_next_context_close (shared);
    shared = NULL;
  }
}

/* Connections open no plugin context: every callback below uses the
 * shared one through the image.  A read-write connection is refused,
 * with a message saying how to repair, when the image cannot be
 * written (a dirty image with repair=off, errors found by
 * repair=check); by default a dirty image is repaired at the first
 * write.
 */
static void *
qcow2_open (nbdkit_next_open *next, nbdkit_context *context,
            int readonly, const char *exportname, int is_tls)
{
  pthread_mutex_lock (&open_lock);
  if (image == NULL &&
      open_image (nbdkit_context_get_backend (context)) == -1) {
    pthread_mutex_unlock (&open_lock);
    return NULL;
  }
  pthread_mutex_unlock (&open_lock);
  if (!readonly && q2_is_writable (image) && q2_check_writable (image) == -1)
    return NULL;
  return NBDKIT_HANDLE_NOT_NEEDED;
}

static const char *
qcow2_export_description (nbdkit_next *next, void *handle)
{
  const char *base = shared->export_description (shared);

  if (base == NULL)
    return NULL;
  return nbdkit_printf_intern ("qcow2 image in: %s", base);
}

static int64_t
qcow2_get_size (nbdkit_next *next, void *handle)
{
  return q2_size (image);
}

/* The plugin's minimum passes up, so that a client never makes the
 * layer split requests more finely than the plugin can take them.
 */
static int
qcow2_block_size (nbdkit_next *next, void *handle,
                  uint32_t *minimum, uint32_t *preferred, uint32_t *maximum)
{
  if (shared->block_size (shared, minimum, preferred, maximum) == -1)
    return -1;
  if (*minimum <= 1 && !q2_params.opts.compress) {
    *minimum = *preferred = *maximum = 0;   /* no constraints */
    return 0;
  }
  if (*minimum < 1)
    *minimum = 1;
  if (*preferred < *minimum)
    *preferred = *minimum;
  /* With compress=true every write is a read-modify-write of whole
   * clusters: ask clients for whole, aligned clusters.
   */
  if (q2_params.opts.compress && *preferred < q2_cluster_size (image))
    *preferred = q2_cluster_size (image);
  *maximum = 0xffffffff;
  return 0;
}

static int
qcow2_can_write (nbdkit_next *next, void *handle)
{
  return q2_is_writable (image);
}

static int
qcow2_can_flush (nbdkit_next *next, void *handle)
{
  return 1;
}

static int
qcow2_is_rotational (nbdkit_next *next, void *handle)
{
  return shared->is_rotational (shared);
}

static int
qcow2_can_trim (nbdkit_next *next, void *handle)
{
  return 1;
}

static int
qcow2_can_zero (nbdkit_next *next, void *handle)
{
  return 1;
}

static int
qcow2_can_fast_zero (nbdkit_next *next, void *handle)
{
  return 1;
}

/* FUA is a flush after the write: q2_flush covers every connection. */
static int
qcow2_can_fua (nbdkit_next *next, void *handle)
{
  return NBDKIT_FUA_EMULATE;
}

/* One image and one set of caches serve every connection, so a flush
 * on any connection makes every completed write durable.
 */
static int
qcow2_can_multi_conn (nbdkit_next *next, void *handle)
{
  return 1;
}

static int
qcow2_can_extents (nbdkit_next *next, void *handle)
{
  return 1;
}

static int
qcow2_can_cache (nbdkit_next *next, void *handle)
{
  return NBDKIT_CACHE_NONE;
}

static int
qcow2_pread (nbdkit_next *next, void *handle, void *buf, uint32_t count,
             uint64_t offset, uint32_t flags, int *err)
{
  if (q2_read (image, buf, count, offset) == -1) {
    *err = errno;
    return -1;
  }
  return 0;
}

static int
qcow2_pwrite (nbdkit_next *next, void *handle, const void *buf,
              uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  if (q2_write (image, buf, count, offset) == -1) {
    *err = errno;
    return -1;
  }
  return 0;
}

static int
qcow2_zero (nbdkit_next *next, void *handle, uint32_t count, uint64_t offset,
            uint32_t flags, int *err)
{
  if (q2_zero (image, count, offset, q2_glue_zero_flags (flags)) == -1) {
    *err = errno;
    return -1;
  }
  return 0;
}

static int
qcow2_trim (nbdkit_next *next, void *handle, uint32_t count, uint64_t offset,
            uint32_t flags, int *err)
{
  if (q2_trim (image, count, offset) == -1) {
    *err = errno;
    return -1;
  }
  return 0;
}

static int
qcow2_flush (nbdkit_next *next, void *handle, uint32_t flags, int *err)
{
  if (q2_flush (image) == -1) {
    *err = errno;
    return -1;
  }
  return 0;
}

static int
qcow2_extents (nbdkit_next *next, void *handle, uint32_t count,
               uint64_t offset, uint32_t flags,
               struct nbdkit_extents *extents, int *err)
{
  if (q2_glue_extents (image, count, offset, flags, extents) == -1) {
    *err = errno;
    return -1;
  }
  return 0;
}

static struct nbdkit_filter filter = {
  .name               = "qcow2",
  .longname           = "nbdkit qcow2 filter",
  .description        = "Serve a qcow2 image held by the plugin, reading "
                        "and writing.",
  .load               = qcow2_load,
  .unload             = qcow2_unload,
  .config             = qcow2_config,
  .config_complete    = qcow2_config_complete,
  .config_help        = qcow2_config_help,
  .get_ready          = qcow2_get_ready,
  .after_fork         = qcow2_after_fork,
  .cleanup            = qcow2_cleanup,
  .open               = qcow2_open,
  .export_description = qcow2_export_description,
  .get_size           = qcow2_get_size,
  .block_size         = qcow2_block_size,
  .can_write          = qcow2_can_write,
  .can_flush          = qcow2_can_flush,
  .is_rotational      = qcow2_is_rotational,
  .can_trim           = qcow2_can_trim,
  .can_zero           = qcow2_can_zero,
  .can_fast_zero      = qcow2_can_fast_zero,
  .can_fua            = qcow2_can_fua,
  .can_multi_conn     = qcow2_can_multi_conn,
  .can_extents        = qcow2_can_extents,
  .can_cache          = qcow2_can_cache,
  .pread              = qcow2_pread,
  .pwrite             = qcow2_pwrite,
  .zero               = qcow2_zero,
  .trim               = qcow2_trim,
  .flush              = qcow2_flush,
  .extents            = qcow2_extents,
};

NBDKIT_REGISTER_FILTER (filter)
