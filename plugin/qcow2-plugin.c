/* nbdkit-qcow2: the nbdkit plugin glue.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * config -> get_ready opens the one image this process serves; every
 * connection shares it through the thread-safe mapping layer, so the
 * per-connection handle carries nothing.
 */

#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "qcow2.h"
#include "qcow2-params.h"
#include "qcow2-glue.h"
#include "qcow2-nbd.h"

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

/* -D qcow2.map=1: log every mapping.  -D qcow2.cache=1: cache stats. */
NBDKIT_DLL_PUBLIC int qcow2_debug_map = 0;
NBDKIT_DLL_PUBLIC int qcow2_debug_cache = 0;
extern int q2_debug_map;

static char *filename;
static char *file_arg;          /* file= as given, resolved later */
static struct q2_image *image;

static void
qcow2_load (void)
{
  q2_glue_load ();
}

static void
qcow2_unload (void)
{
  free (filename);
  free (file_arg);
  q2_params_free ();
}

static int
qcow2_config (const char *key, const char *value)
{
  int r;

  /* Resolved in config_complete: with create=true it need not exist. */
  if (strcmp (key, "file") == 0) {
    free (file_arg);
    file_arg = strdup (value);
    if (file_arg == NULL) {
      nbdkit_error ("strdup: %m");
      return -1;
    }
    return 0;
  }
  r = q2_params_config (key, value);
  if (r == 1) {
    nbdkit_error ("unknown parameter '%s'", key);
    return -1;
  }
  return r;
}

static int
qcow2_config_complete (void)
{
  if (file_arg == NULL) {
    nbdkit_error ("you must supply the file=<FILENAME> parameter");
    return -1;
  }
  if (q2_params_complete () == -1)
    return -1;
  free (filename);
  if (q2_params.create)
    filename = q2_params_create_path (file_arg);
  else
    filename = nbdkit_realpath (file_arg);
  return filename ? 0 : -1;
}

#define qcow2_config_help \
  "[file=]<FILENAME>     (required) The qcow2 image to serve.\n" \
  Q2_PARAMS_HELP ("")

static void
qcow2_dump_plugin (void)
{
  printf ("%s\n", q2_features ());
  printf ("qcow2_create=yes\n");
}

/* Open the image once, before any connection.  `-r` is not known yet,
 * so open read-write where possible; nothing is written until a client
 * writes.
 */
/* create=true made FILE (and its data file) a moment ago, but the
 * start failed after all (an option the open refuses, such as
 * compress=true with encryption, or a backing file that cannot be
 * opened): a failed start leaves no file behind.
 */
static void
undo_create (void)
{
  if (!q2_params.create)
    return;
  if (unlink (filename) == -1)
    nbdkit_error ("%s: cannot remove the new image: %m", filename);
  if (q2_params.data_file && unlink (q2_params.data_file) == -1)
    nbdkit_error ("%s: cannot remove the new data file: %m",
                  q2_params.data_file);
}

static int
qcow2_get_ready (void)
{
  q2_debug_map = qcow2_debug_map;
  if (q2_params.create && q2_params_create (filename) == -1)
    return -1;
  if (q2_open (filename, &q2_params.opts, &image) == -1) {
    undo_create ();
    return -1;
  }
  if (q2_params_snapshot_ops (image) == -1) {
    q2_close (image);           /* flushes what was done */
    image = NULL;
    undo_create ();
    return -1;
  }
  return 0;
}

/* Threads (an NBD backing's connection thread) start only now. */
static int
qcow2_after_fork (void)
{
  q2_nbd_after_fork ();
  return 0;
}

static void
qcow2_cleanup (void)
{
  if (qcow2_debug_cache && image)
    q2_log_stats (image);
  q2_close (image);
  image = NULL;
}

/* A read-write connection is refused, with a message saying how to
 * repair, when the image cannot be written: a dirty image with
 * repair=off, or one whose check at open (repair=check) found errors.
 * With repair=auto (the default) a dirty image is repaired at the
 * first write.
 */
static void *
qcow2_open (int readonly)
{
  if (!readonly && q2_is_writable (image) && q2_check_writable (image) == -1)
    return NULL;
  return NBDKIT_HANDLE_NOT_NEEDED;
}

static int64_t
qcow2_get_size (void *handle)
{
  return q2_size (image);
}

/* With compress=true every write is a read-modify-write of whole
 * clusters: ask clients (nbdcopy) for whole, aligned clusters.
 */
static int
qcow2_block_size (void *handle, uint32_t *minimum, uint32_t *preferred,
                  uint32_t *maximum)
{
  if (!q2_params.opts.compress) {
    *minimum = *preferred = *maximum = 0;       /* no constraints */
    return 0;
  }
  *minimum = 1;
  *preferred = q2_cluster_size (image);
  *maximum = 0xffffffff;
  return 0;
}

static int
qcow2_can_write (void *handle)
{
  return q2_is_writable (image);
}

static int
qcow2_can_flush (void *handle)
{
  return 1;
}

static int
qcow2_can_trim (void *handle)
{
  return 1;
}

static int
qcow2_can_zero (void *handle)
{
  return 1;
}

static int
qcow2_can_fast_zero (void *handle)
{
  return 1;
}

/* FUA is a flush after the write: q2_flush covers every connection. */
static int
qcow2_can_fua (void *handle)
{
  return NBDKIT_FUA_EMULATE;
}

/* One image and one set of caches serve every connection, so a flush
 * on any connection makes every completed write durable.
 */
static int
qcow2_can_multi_conn (void *handle)
{
  return 1;
}

static int
qcow2_can_extents (void *handle)
{
  return 1;
}

static int
qcow2_pread (void *handle, void *buf, uint32_t count, uint64_t offset,
             uint32_t flags)
{
  return q2_read (image, buf, count, offset);
}

static int
qcow2_pwrite (void *handle, const void *buf, uint32_t count, uint64_t offset,
              uint32_t flags)
{
  return q2_write (image, buf, count, offset);
}

static int
qcow2_zero (void *handle, uint32_t count, uint64_t offset, uint32_t flags)
{
  return q2_zero (image, count, offset, q2_glue_zero_flags (flags));
}

static int
qcow2_trim (void *handle, uint32_t count, uint64_t offset, uint32_t flags)
{
  return q2_trim (image, count, offset);
}

static int
qcow2_flush (void *handle, uint32_t flags)
{
  return q2_flush (image);
}

static int
qcow2_extents (void *handle, uint32_t count, uint64_t offset, uint32_t flags,
               struct nbdkit_extents *extents)
{
  return q2_glue_extents (image, count, offset, flags, extents);
}

static struct nbdkit_plugin plugin = {
  .name              = "qcow2",
  .longname          = "nbdkit qcow2 plugin",
  .version           = PACKAGE_VERSION,
  .description       = "Serve qcow2 disk images, reading and writing.",
  .load              = qcow2_load,
  .unload            = qcow2_unload,
  .config            = qcow2_config,
  .config_complete   = qcow2_config_complete,
  .config_help       = qcow2_config_help,
  .magic_config_key  = "file",
  .dump_plugin       = qcow2_dump_plugin,
  .get_ready         = qcow2_get_ready,
  .after_fork        = qcow2_after_fork,
  .cleanup           = qcow2_cleanup,
  .open              = qcow2_open,
  .get_size          = qcow2_get_size,
  .block_size        = qcow2_block_size,
  .can_write         = qcow2_can_write,
  .can_flush         = qcow2_can_flush,
  .can_trim          = qcow2_can_trim,
  .can_zero          = qcow2_can_zero,
  .can_fast_zero     = qcow2_can_fast_zero,
  .can_fua           = qcow2_can_fua,
  .can_multi_conn    = qcow2_can_multi_conn,
  .can_extents       = qcow2_can_extents,
  .pread             = qcow2_pread,
  .pwrite            = qcow2_pwrite,
  .zero              = qcow2_zero,
  .trim              = qcow2_trim,
  .flush             = qcow2_flush,
  .extents           = qcow2_extents,
  .errno_is_preserved = 1,
};

NBDKIT_REGISTER_PLUGIN (plugin)
