/* nbdkit-qcow2: backing chains and external data files.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Policy for file names written inside an image (an untrusted image can
 * name any path):
 *  - A backing file's format is never probed.  It comes from the image's
 *    backing-format extension or from backing-format=; otherwise the
 *    open fails.  Probing would let a raw file that a guest filled with
 *    a fake qcow2 header redirect reads to arbitrary host files.
 *  - Backing files are opened read-only; the chain is at most
 *    Q2_MAX_CHAIN images long and may not contain a file twice.
 *  - Relative names are resolved against the directory of the image
 *    that names them, as QEMU does.
 *  - backing=, backing-format= and data-file= override the top image.
 *  - An NBD name (qcow2-nbd.c) found inside an image is followed only
 *    with allow-remote-backing=true: an image from elsewhere must not
 *    make us open network connections.  backing= is always followed.
 *    An image read from an NBD server may not name local files.
 */

#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"
#include "qcow2-nbd.h"

/* name relative to the directory of base, unless it is absolute. */
static char *
resolve (const char *base, const char *name)
{
  const char *slash = strrchr (base, '/');
  size_t dirlen = slash ? (size_t) (slash - base) + 1 : 0;
  char *r;

  if (name[0] == '/' || dirlen == 0)
    return strdup (name);
  r = malloc (dirlen + strlen (name) + 1);
  if (r) {
    memcpy (r, base, dirlen);
    strcpy (r + dirlen, name);
  }
  return r;
}

static int
open_member (const char *path, const char *fmt, const struct q2_open_opts *opts,
             unsigned depth, struct q2_io **chain, struct q2_image **out)
{
  struct q2_io *io;
  unsigned i;
  int r;

  if (q2_nbd_is_name (path))
    io = q2_io_nbd_open (path);
  else
    io = q2_io_file_open (path, true);
  if (io == NULL)
    return -1;
  for (i = 0; i < depth; i++) {
    if (chain[i]->remote || io->remote
        ? chain[i]->remote && io->remote &&
          strcmp (chain[i]->name, io->name) == 0
        : chain[i]->dev == io->dev && chain[i]->ino == io->ino) {
      q2_error ("%s: backing chain loop: this file is already in the chain "
                "(as %s)", path, chain[i]->name);
      q2_io_close (io);
      errno = ELOOP;
      return -1;
    }
  }
  chain[depth] = io;
  if (strcmp (fmt, "raw") == 0)
    r = q2_open_raw (io, out);
  else
    r = q2_open_qcow2 (io, opts, depth, chain, true, out);
  if (r == -1)
    q2_io_close (io);
  return r;
}

/* A json: name may say the format itself ("driver" beside "file"):
 * it must agree with the one recorded (or given), and stands in for
 * none.  *fmt may then point into jfmt.
 */
static int
check_name_format (struct q2_image *img, const char *name, const char **fmt,
                   char *jfmt, size_t len)
{
  if (!q2_nbd_name_format (name, jfmt, len))
    return 0;
  if (*fmt && strcmp (*fmt, jfmt) != 0)
    return Q2_FAIL (EINVAL, "%s: the backing name '%s' says format '%s', "
                    "but the format given for it is '%s'", img->filename,
                    name, jfmt, *fmt);
  *fmt = jfmt;
  return 0;
}

int
q2_open_backing (struct q2_image *img, const struct q2_open_opts *opts,
                 unsigned depth, struct q2_io **chain)
{
  const char *name = img->h.backing_name;
  const char *fmt = img->h.backing_format;
  bool explicit = false;
  char *path, jfmt[32];
  int r;

  if (depth == 0 && opts->backing) {
    if (strcmp (opts->backing, "none") == 0)
      return 0;
    name = opts->backing;
    explicit = true;
  }
  if (name == NULL)
    return 0;
  if (depth == 0 && opts->backing_format)
    fmt = opts->backing_format;
  if (check_name_format (img, name, &fmt, jfmt, sizeof jfmt) == -1)
    return -1;
  if (fmt == NULL)
    return Q2_FAIL (EINVAL, "%s: the image does not record the format of "
                    "its backing file '%s', and formats are never probed; "
                    "give %sbacking-format=raw or %sbacking-format=qcow2 "
                    "(or %sbacking=none)", img->filename, name,
                    Q2_PREFIX (opts), Q2_PREFIX (opts), Q2_PREFIX (opts));
  if (strcmp (fmt, "raw") != 0 && strcmp (fmt, "qcow2") != 0)
    return Q2_FAIL (ENOTSUP, "%s: backing file '%s' has format '%s'; only "
                    "raw and qcow2 backing files are supported",
                    img->filename, name, fmt);
  if (depth + 1 >= Q2_MAX_CHAIN)
    return Q2_FAIL (ELOOP, "%s: backing chain is longer than %d images",
                    img->filename, Q2_MAX_CHAIN);
  if (q2_nbd_is_name (name)) {
    if (!explicit && !opts->allow_remote_backing)
      return Q2_FAIL (EPERM, "%s: the backing file '%s' is on an NBD "
                      "server; network backing names found inside an image "
                      "are followed only with %sallow-remote-backing=true "
                      "(or name the backing explicitly with %sbacking=)",
                      img->filename, name, Q2_PREFIX (opts),
                      Q2_PREFIX (opts));
    return open_member (name, fmt, opts, depth + 1, chain, &img->backing);
  }
  if (img->io->remote && !explicit)
    return Q2_FAIL (EPERM, "%s: the image is on an NBD server and names "
                    "the local backing file '%s'; local files named by "
                    "remote images are never opened", img->filename, name);
  path = resolve (img->filename, name);
  if (path == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
  r = open_member (path, fmt, opts, depth + 1, chain, &img->backing);
  free (path);
  return r;
}

int
q2_open_data_file (struct q2_image *img, const struct q2_open_opts *opts,
                   unsigned depth)
{
  const char *name = img->h.data_file_name;
  struct q2_io *io;
  char *path;

  if (depth == 0 && opts->data_file)
    name = opts->data_file;
  if (!(img->h.incompat & QCOW2_INCOMPAT_DATA_FILE)) {
    if (depth == 0 && opts->data_file)
      return Q2_FAIL (EINVAL, "%s: %sdata-file= was given, but the image "
                      "has no external data file", img->filename,
                      Q2_PREFIX (opts));
    return 0;
  }
  if (name == NULL)
    return Q2_FAIL (EINVAL, "%s: the image keeps its data in an external "
                    "file but does not name it; give %sdata-file=",
                    img->filename, Q2_PREFIX (opts));
  if (img->io->remote && !(depth == 0 && opts->data_file))
    return Q2_FAIL (EPERM, "%s: the image is on an NBD server and names "
                    "the local data file '%s'; local files named by "
                    "remote images are never opened", img->filename, name);
  path = resolve (img->filename, name);
  if (path == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", img->filename);
  io = q2_io_file_open (path, img->io->readonly);
  free (path);
  if (io == NULL)
    return -1;
  img->data_io = io;
  return 0;
}
