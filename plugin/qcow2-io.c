/* nbdkit-qcow2: file access behind a replaceable interface.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Two back ends: a plain file (pread/pwrite/fdatasync) and an in-memory
 * buffer for unit tests and fuzzers.  Reads past the end of a file
 * return zeros because qcow2 allows clusters that end past EOF.
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcow2-internal.h"

/* ---- plain files ---- */

struct file_io {
  struct q2_io io;
  int fd;
  bool sync_failed;             /* an fdatasync failed: data may be lost */
};

static int
file_pread (struct q2_io *io, void *buf, size_t n, uint64_t off)
{
  struct file_io *f = (struct file_io *) io;
  char *p = buf;

  while (n > 0) {
    ssize_t r = pread (f->fd, p, n, off);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return Q2_FAIL (errno, "%s: read at offset %" PRIu64 ": %m",
                      io->name, off);
    }
    if (r == 0) {                       /* EOF: the rest reads as zeros */
      memset (p, 0, n);
      break;
    }
    p += r; n -= r; off += r;
  }
  return 0;
}

int
q2_pwrite_all (int fd, const char *name, const void *buf, size_t n,
               uint64_t off)
{
  const char *p = buf;

  while (n > 0) {
    ssize_t r = pwrite (fd, p, n, off);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return Q2_FAIL (errno, "%s: write at offset %" PRIu64 ": %m",
                      name, off);
    }
    p += r; n -= r; off += r;
  }
  return 0;
}

static int
file_pwrite (struct q2_io *io, const void *buf, size_t n, uint64_t off)
{
  struct file_io *f = (struct file_io *) io;

  return q2_pwrite_all (f->fd, io->name, buf, n, off);
}

static int
file_flush (struct q2_io *io)
{
  struct file_io *f = (struct file_io *) io;

  /* A failed fdatasync may have dropped the dirty pages it could not
   * write, and the next one would succeed without them: never claim
   * durability again.
   */
  if (__atomic_load_n (&f->sync_failed, __ATOMIC_ACQUIRE))
    return Q2_FAIL (EIO, "%s: an earlier fdatasync failed; refusing to "
                    "flush", io->name);
  if (fdatasync (f->fd) == -1) {
    __atomic_store_n (&f->sync_failed, true, __ATOMIC_RELEASE);
    return Q2_FAIL (errno, "%s: fdatasync: %m", io->name);
  }
  return 0;
}

static int64_t
file_size (struct q2_io *io)
{
  struct file_io *f = (struct file_io *) io;
  struct stat st;

  if (fstat (f->fd, &st) == -1)
    return Q2_FAIL (errno, "%s: fstat: %m", io->name);
  return st.st_size;
}

/* SEEK_DATA/SEEK_HOLE, for the status of raw backing files. */
static int
file_data_status (struct q2_io *io, uint64_t off, uint64_t n,
                  uint64_t *len, bool *is_data)
{
  struct file_io *f = (struct file_io *) io;
  off_t next;

  next = lseek (f->fd, off, SEEK_DATA);
  if (next == -1 && errno == ENXIO) {   /* a hole up to EOF */
    *is_data = false;
    *len = n;
    return 0;
  }
  if (next == -1) {                     /* no support: say data */
    *is_data = true;
    *len = n;
    return 0;
  }
  if ((uint64_t) next > off) {
    *is_data = false;
    *len = (uint64_t) next - off < n ? (uint64_t) next - off : n;
    return 0;
  }
  next = lseek (f->fd, off, SEEK_HOLE);
  *is_data = true;
  if (next == -1 || (uint64_t) next <= off)
    *len = n;
  else
    *len = (uint64_t) next - off < n ? (uint64_t) next - off : n;
  return 0;
}

static void
file_close (struct q2_io *io)
{
  struct file_io *f = (struct file_io *) io;

  close (f->fd);
}

static const struct q2_io_ops file_ops = {
  .pread = file_pread,
  .pwrite = file_pwrite,
  .flush = file_flush,
  .size = file_size,
  .data_status = file_data_status,
  .close = file_close,
};

struct q2_io *
q2_io_file_open (const char *path, bool readonly)
{
  struct file_io *f;
  struct stat st;
  int fd;

  fd = open (path, (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  if (fd == -1) {
    q2_error ("%s: open: %m", path);
    return NULL;
  }
  if (fstat (fd, &st) == -1 || !(S_ISREG (st.st_mode) || S_ISBLK (st.st_mode))) {
    if (errno == 0 || S_ISDIR (st.st_mode))
      errno = EINVAL;
    q2_error ("%s: not a regular file or block device", path);
    close (fd);
    return NULL;
  }
  f = calloc (1, sizeof *f);
  if (f == NULL || (f->io.name = strdup (path)) == NULL) {
    free (f);
    close (fd);
    q2_error ("%s: calloc: %m", path);
    return NULL;
  }
  f->io.ops = &file_ops;
  f->io.readonly = readonly;
  f->io.dev = st.st_dev;
  f->io.ino = st.st_ino;
  f->fd = fd;
  return &f->io;
}

/* ---- memory ---- */

struct mem_io {
  struct q2_io io;
  pthread_mutex_t lock;
  uint8_t *data;
  size_t len;
};

static int
mem_pread (struct q2_io *io, void *buf, size_t n, uint64_t off)
{
  struct mem_io *m = (struct mem_io *) io;
  size_t avail;

  pthread_mutex_lock (&m->lock);
  avail = off < m->len ? m->len - off : 0;
  if (avail > n)
    avail = n;
  if (avail)
    memcpy (buf, m->data + off, avail);
  memset ((char *) buf + avail, 0, n - avail);
  pthread_mutex_unlock (&m->lock);
  return 0;
}

static int
mem_pwrite (struct q2_io *io, const void *buf, size_t n, uint64_t off)
{
  struct mem_io *m = (struct mem_io *) io;
  int r = 0;

  pthread_mutex_lock (&m->lock);
  if (off + n > m->len) {
    uint8_t *p;

    if (off + n > (size_t) 1 << 32 || !(p = realloc (m->data, off + n))) {
      r = Q2_FAIL (ENOSPC, "%s: write at offset %" PRIu64 ": no space",
                   io->name, off);
      goto out;
    }
    memset (p + m->len, 0, off + n - m->len);
    m->data = p;
    m->len = off + n;
  }
  memcpy (m->data + off, buf, n);
 out:
  pthread_mutex_unlock (&m->lock);
  return r;
}

static int
mem_flush (struct q2_io *io)
{
  return 0;
}

static int64_t
mem_size (struct q2_io *io)
{
  struct mem_io *m = (struct mem_io *) io;
  int64_t r;

  pthread_mutex_lock (&m->lock);
  r = m->len;
  pthread_mutex_unlock (&m->lock);
  return r;
}

static void
mem_close (struct q2_io *io)
{
  struct mem_io *m = (struct mem_io *) io;

  pthread_mutex_destroy (&m->lock);
  free (m->data);
}

static const struct q2_io_ops mem_ops = {
  .pread = mem_pread,
  .pwrite = mem_pwrite,
  .flush = mem_flush,
  .size = mem_size,
  .close = mem_close,
};

struct q2_io *
q2_io_mem_new (const char *name, const void *data, size_t len, bool readonly)
{
  struct mem_io *m = calloc (1, sizeof *m);

  if (m == NULL)
    return NULL;
  m->io.ops = &mem_ops;
  m->io.name = strdup (name);
  m->io.readonly = readonly;
  m->data = malloc (len ? len : 1);
  if (m->io.name == NULL || m->data == NULL) {
    free (m->io.name);
    free (m->data);
    free (m);
    return NULL;
  }
  memcpy (m->data, data, len);
  m->len = len;
  pthread_mutex_init (&m->lock, NULL);
  return &m->io;
}

/* ---- common ---- */

void
q2_io_close (struct q2_io *io)
{
  if (io == NULL)
    return;
  io->ops->close (io);
  free (io->name);
  free (io);
}

int
q2_io_pread (struct q2_io *io, void *buf, size_t n, uint64_t off)
{
  return io->ops->pread (io, buf, n, off);
}

int64_t
q2_io_size (struct q2_io *io)
{
  return io->ops->size (io);
}
