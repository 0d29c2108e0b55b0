/* nbdkit-qcow2 tests: workload, guest-disk model and qemu-img helpers
 * shared by test-faults and test-powerloss.
 * SPDX-License-Identifier: BSD-3-Clause
 */

#include <config.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

#include "qcow2.h"
#include "faultlib.h"

static uint32_t
get_be32 (const uint8_t *p)
{
  return (uint32_t) p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3];
}

/* ---- random numbers ---- */

uint64_t
fl_rand (uint64_t *s)
{
  uint64_t z = (*s += UINT64_C (0x9e3779b97f4a7c15));

  z = (z ^ (z >> 30)) * UINT64_C (0xbf58476d1ce4e5b9);
  z = (z ^ (z >> 27)) * UINT64_C (0x94d049bb133111eb);
  return z ^ (z >> 31);
}

uint64_t
fl_below (uint64_t *s, uint64_t n)
{
  return n ? fl_rand (s) % n : 0;
}

void
fl_fill (uint8_t *buf, uint64_t len, uint64_t seed)
{
  uint64_t s = seed, i;

  for (i = 0; i + 8 <= len; i += 8) {
    uint64_t v = fl_rand (&s);
    memcpy (buf + i, &v, 8);
  }
  if (i < len) {
    uint64_t v = fl_rand (&s);
    memcpy (buf + i, &v, len - i);
  }
}

/* ---- workload ---- */

const char *
fl_kind_name (enum fl_kind k)
{
  switch (k) {
  case FL_WRITE: return "write";
  case FL_ZERO: return "zero";
  case FL_ZERO_TRIM: return "zero-may-trim";
  case FL_TRIM: return "trim";
  case FL_FLUSH: return "flush";
  case FL_READ: return "read";
  }
  return "?";
}

static void
pick_range (uint64_t *s, uint64_t size, uint64_t cluster, uint64_t *off,
            uint64_t *len)
{
  uint64_t a = fl_below (s, 100), l, o, span;
  uint64_t unit = cluster < 16 * KiB ? 16 * KiB : cluster;

  /* Lengths: small, up to three units, or up to eight (a unit is a
   * cluster, or 16 KiB with smaller clusters so that the file grows).
   */
  if (a < 35)
    l = 1 + fl_below (s, 4096);
  else if (a < 85)
    l = 1 + fl_below (s, 3 * unit);
  else
    l = 1 + fl_below (s, 8 * unit);
  if (l > MiB)
    l = MiB;
  if (l > size)
    l = size;
  /* Half of the requests go to the first quarter, so that clusters are
   * written over again.
   */
  span = fl_below (s, 2) ? size / 4 : size;
  if (span < l)
    span = l;
  o = fl_below (s, span - l + 1);
  switch (fl_below (s, 3)) {
  case 0: break;                                  /* unaligned */
  case 1: o &= ~UINT64_C (511); break;
  default:
    o &= ~(cluster - 1);
    if (fl_below (s, 2) && l >= cluster)
      l &= ~(cluster - 1);
  }
  if (o + l > size)
    l = size - o;
  *off = o;
  *len = l;
}

void
fl_workload_gen (struct fl_workload *w, uint64_t seed, uint64_t size,
                 uint64_t cluster, size_t nops)
{
  uint64_t s = seed ^ UINT64_C (0x5eed5eed);
  size_t i;

  w->n = nops;
  w->ops = calloc (nops, sizeof *w->ops);
  if (w->ops == NULL)
    abort ();
  for (i = 0; i < nops; i++) {
    struct fl_op *op = &w->ops[i];
    uint64_t k = fl_below (&s, 100);

    op->kind = k < 50 ? FL_WRITE : k < 60 ? FL_ZERO : k < 68 ? FL_ZERO_TRIM
             : k < 76 ? FL_TRIM : k < 88 ? FL_FLUSH : FL_READ;
    if (i == nops - 1)
      op->kind = FL_FLUSH;
    if (op->kind != FL_FLUSH)
      pick_range (&s, size, cluster, &op->off, &op->len);
    op->seed = fl_rand (&s);
  }
}

void
fl_workload_free (struct fl_workload *w)
{
  free (w->ops);
  w->ops = NULL;
}

/* ---- model ---- */

void
fl_model_init (struct fl_model *m, uint64_t size, const uint8_t *initial)
{
  memset (m, 0, sizeof *m);
  m->size = size;
  m->val = calloc (size, 1);
  m->alt = calloc (size, 1);
  m->st = calloc (size, 1);
  m->touched = calloc (size, 1);
  if (!m->val || !m->alt || !m->st || !m->touched)
    abort ();
  if (initial)
    memcpy (m->val, initial, size);
}

void
fl_model_reset (struct fl_model *m, const uint8_t *initial)
{
  if (initial)
    memcpy (m->val, initial, m->size);
  else
    memset (m->val, 0, m->size);
  memset (m->st, FL_EXACT, m->size);
  memset (m->touched, 0, m->size);
  m->ntr = 0;
}

void
fl_model_free (struct fl_model *m)
{
  free (m->val);
  free (m->alt);
  free (m->st);
  free (m->touched);
  free (m->tr);
  memset (m, 0, sizeof *m);
}

void
fl_model_touch (struct fl_model *m, uint64_t off, uint64_t len)
{
  if (len == 0)
    return;
  if (m->ntr == m->captr) {
    m->captr = m->captr ? 2 * m->captr : 64;
    m->tr = realloc (m->tr, m->captr * sizeof *m->tr);
    if (m->tr == NULL)
      abort ();
  }
  m->tr[m->ntr].off = off;
  m->tr[m->ntr].len = len;
  m->ntr++;
  memset (m->touched + off, 1, len);
}

void
fl_model_apply (struct fl_model *m, const struct fl_op *op,
                const uint8_t *data, bool ok)
{
  uint64_t i;

  if (op->kind == FL_FLUSH || op->kind == FL_READ)
    return;
  fl_model_touch (m, op->off, op->len);
  if (op->kind == FL_TRIM) {
    /* Trimmed data is unspecified, whether or not the trim worked. */
    memset (m->st + op->off, FL_ANY, op->len);
    return;
  }
  if (ok) {
    if (op->kind == FL_WRITE)
      memcpy (m->val + op->off, data, op->len);
    else
      memset (m->val + op->off, 0, op->len);
    memset (m->st + op->off, FL_EXACT, op->len);
    return;
  }
  /* A failed request may have changed any part of its range. */
  for (i = 0; i < op->len; i++) {
    uint64_t b = op->off + i;
    uint8_t v = op->kind == FL_WRITE ? data[i] : 0;

    if (m->st[b] == FL_EXACT) {
      if (v != m->val[b]) {
        m->alt[b] = v;
        m->st[b] = FL_EITHER;
      }
    }
    else if (m->st[b] == FL_EITHER && v != m->val[b] && v != m->alt[b])
      m->st[b] = FL_ANY;
  }
}

void
fl_model_flushed (struct fl_model *m)
{
  size_t i;

  for (i = 0; i < m->ntr; i++)
    memset (m->touched + m->tr[i].off, 0, m->tr[i].len);
  m->ntr = 0;
}

uint64_t
fl_model_check (const struct fl_model *m, const uint8_t *actual,
                uint64_t off, uint64_t len, bool skip_touched,
                uint64_t *compared, const char *what)
{
  uint64_t i, bad = 0, n = 0;

  if (compared) {
    for (i = 0; i < len; i++)
      n += m->st[off + i] == FL_EXACT &&
           !(skip_touched && m->touched[off + i]);
  }
  for (i = 0; i < len; i++) {
    uint64_t b = off + i;
    uint8_t a = actual[i];

    /* Fast path: a run equal to the expected values passes whatever
     * the state of its bytes.
     */
    if (i % 4096 == 0 && len - i >= 4096 &&
        memcmp (actual + i, m->val + b, 4096) == 0) {
      i += 4095;
      continue;
    }

    if (skip_touched && m->touched[b])
      continue;
    switch (m->st[b]) {
    case FL_EXACT:
      if (a == m->val[b])
        continue;
      break;
    case FL_EITHER:
      if (a == m->val[b] || a == m->alt[b])
        continue;
      break;
    default:
      continue;
    }
    if (bad < 5)
      fprintf (stderr, "%s: guest byte %" PRIu64 " is 0x%02x, expected "
               "0x%02x%s%s\n", what, b, a, m->val[b],
               m->st[b] == FL_EITHER ? " or another" : "",
               m->touched[b] ? " (changed since the last flush)" : "");
    bad++;
  }
  if (bad > 5)
    fprintf (stderr, "%s: %" PRIu64 " bytes differ in all\n", what, bad);
  if (compared)
    *compared += n;
  return bad;
}

uint64_t
fl_model_known_byte (const struct fl_model *m, uint64_t seed)
{
  uint64_t s = seed, start = fl_below (&s, m->size), i;

  for (i = 0; i < m->size; i++) {
    uint64_t b = (start + i) % m->size;

    if (m->st[b] == FL_EXACT && !m->touched[b])
      return b;
  }
  return UINT64_MAX;
}

/* ---- processes and files ---- */

int
fl_run (char *const argv[], const char *logfile)
{
  posix_spawn_file_actions_t fa;
  pid_t pid;
  int status, r;

  /* posix_spawn, not fork: copying the page tables of a process with a
   * large model would cost more than qemu-img itself.
   */
  fflush (stdout);
  fflush (stderr);
  posix_spawn_file_actions_init (&fa);
  posix_spawn_file_actions_addopen (&fa, 1, logfile ? logfile : "/dev/null",
                                    O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2 (&fa, 1, 2);
  r = posix_spawnp (&pid, argv[0], &fa, NULL, argv, environ);
  posix_spawn_file_actions_destroy (&fa);
  if (r != 0) {
    fprintf (stderr, "%s: %s\n", argv[0], strerror (r));
    return -1;
  }
  while (waitpid (pid, &status, 0) == -1)
    if (errno != EINTR) {
      perror ("waitpid");
      return -1;
    }
  return WIFEXITED (status) ? WEXITSTATUS (status) : -1;
}

int
fl_qemu_check (const char *image, const char *logfile)
{
  char *argv[] = { "qemu-img", "check", "-f", "qcow2", (char *) image, NULL };

  return fl_run (argv, logfile);
}

int
fl_qemu_read_all (const char *image, const char *snapshot,
                  const char *rawpath, uint8_t *buf, uint64_t size)
{
  char *argv[] = { "qemu-img", "convert", "-U", "-t", "unsafe", "-f", "qcow2",
                   "-O", "raw", (char *) image, (char *) rawpath, NULL, NULL,
                   NULL };
  char snapopt[256];
  struct stat st;
  uint64_t got = 0;
  int fd, r = -1;

  if (snapshot) {
    snprintf (snapopt, sizeof snapopt, "snapshot.name=%s", snapshot);
    argv[11] = "-l";
    argv[12] = snapopt;
  }
  unlink (rawpath);
  if (fl_run (argv, NULL) != 0) {
    fprintf (stderr, "qemu-img convert %s failed\n", image);
    return -1;
  }
  fd = open (rawpath, O_RDONLY | O_CLOEXEC);
  if (fd == -1 || fstat (fd, &st) == -1) {
    perror (rawpath);
    goto out;
  }
  if ((uint64_t) st.st_size != size) {
    fprintf (stderr, "qemu-img convert gave %" PRIu64 " bytes, expected %"
             PRIu64 "\n", (uint64_t) st.st_size, size);
    goto out;
  }
  while (got < size) {
    ssize_t n = pread (fd, buf + got, size - got, got);

    if (n <= 0) {
      perror (rawpath);
      goto out;
    }
    got += n;
  }
  r = 0;
 out:
  if (fd >= 0)
    close (fd);
  unlink (rawpath);
  return r;
}

int
fl_write_file (const char *path, const void *data, size_t len)
{
  int fd = open (path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  const char *p = data;

  if (fd == -1) {
    perror (path);
    return -1;
  }
  while (len > 0) {
    ssize_t r = write (fd, p, len);

    if (r <= 0) {
      perror (path);
      close (fd);
      return -1;
    }
    p += r;
    len -= r;
  }
  return close (fd);
}

int
fl_read_file (const char *path, uint8_t **data, size_t *len)
{
  int fd = open (path, O_RDONLY | O_CLOEXEC);
  struct stat st;
  size_t got = 0;

  if (fd == -1 || fstat (fd, &st) == -1) {
    perror (path);
    if (fd >= 0)
      close (fd);
    return -1;
  }
  *data = malloc (st.st_size ? st.st_size : 1);
  if (*data == NULL)
    abort ();
  while (got < (size_t) st.st_size) {
    ssize_t r = read (fd, *data + got, st.st_size - got);

    if (r <= 0) {
      perror (path);
      close (fd);
      free (*data);
      return -1;
    }
    got += r;
  }
  close (fd);
  *len = got;
  return 0;
}

void
fl_print_file (const char *path, int max_lines)
{
  FILE *f = fopen (path, "r");
  char line[512];

  if (f == NULL)
    return;
  while (max_lines-- > 0 && fgets (line, sizeof line, f))
    fprintf (stderr, "  | %s", line);
  fclose (f);
}

void
fl_rm_rf (const char *dir)
{
  DIR *d = opendir (dir);
  struct dirent *e;
  char path[4096];

  if (d == NULL)
    return;
  while ((e = readdir (d)) != NULL) {
    if (strcmp (e->d_name, ".") == 0 || strcmp (e->d_name, "..") == 0)
      continue;
    snprintf (path, sizeof path, "%s/%s", dir, e->d_name);
    unlink (path);
  }
  closedir (d);
  rmdir (dir);
}

int
fl_make_image (const char *path, const char *create_opts, bool compress,
               uint64_t size, uint64_t dense, uint64_t seed,
               uint8_t *initial, uint8_t **file, size_t *file_len)
{
  char rawpath[4096], logpath[4096];
  uint64_t s = seed ^ 0xfeed, off;
  char *argv[16];
  int n = 0, r;

  /* The first half: 32 KiB pieces of data, about half of them. */
  memset (initial, 0, size);
  for (off = 0; off < size / 2; off += 32 * KiB)
    if (fl_below (&s, 2))
      fl_fill (initial + off, 32 * KiB, fl_rand (&s));
  /* Then the first dense bytes all data. */
  fl_fill (initial, dense, fl_rand (&s));
  snprintf (rawpath, sizeof rawpath, "%s.start.raw", path);
  snprintf (logpath, sizeof logpath, "%s.start.log", path);
  if (fl_write_file (rawpath, initial, size) == -1)
    return -1;
  argv[n++] = "qemu-img";
  argv[n++] = "convert";
  argv[n++] = "-f";
  argv[n++] = "raw";
  argv[n++] = "-O";
  argv[n++] = "qcow2";
  if (compress)
    argv[n++] = "-c";
  argv[n++] = "-o";
  argv[n++] = (char *) create_opts;
  argv[n++] = rawpath;
  argv[n++] = (char *) path;
  argv[n] = NULL;
  r = fl_run (argv, logpath);
  unlink (rawpath);
  if (r != 0) {
    fl_print_file (logpath, 20);
    fprintf (stderr, "qemu-img convert -o %s failed\n", create_opts);
    return -1;
  }
  unlink (logpath);
  return fl_read_file (path, file, file_len);
}

int
fl_snapshot_create (const char *path, const char *name, uint8_t **file,
                    size_t *file_len)
{
  char *argv[] = { "qemu-img", "snapshot", "-c", (char *) name,
                   (char *) path, NULL };

  if (fl_run (argv, NULL) != 0) {
    fprintf (stderr, "qemu-img snapshot -c %s %s failed\n", name, path);
    return -1;
  }
  free (*file);
  return fl_read_file (path, file, file_len);
}

int
fl_layer_snapshot_create (const char *path, const char *name, uint8_t **file,
                          size_t *file_len)
{
  struct q2_open_opts o = { .backing = "none" };
  struct q2_image *img;
  int r;

  if (q2_open (path, &o, &img) == -1) {
    fprintf (stderr, "%s: cannot open it to create snapshot %s\n", path,
             name);
    return -1;
  }
  r = q2_snapshot_create (img, name);
  q2_close (img);
  if (r == -1) {
    fprintf (stderr, "%s: q2_snapshot_create %s failed\n", path, name);
    return -1;
  }
  free (*file);
  return fl_read_file (path, file, file_len);
}

/* How many bytes the file may grow before its refcount table is full. */
static int64_t
reftable_slack (const uint8_t *f, size_t len)
{
  uint32_t cbits = get_be32 (f + 20), clusters = get_be32 (f + 56);
  uint32_t order = get_be32 (f + 4) >= 3 ? get_be32 (f + 96) : 4;
  uint64_t cs = UINT64_C (1) << cbits;
  uint64_t covered = (uint64_t) clusters * (cs / 8) * ((cs * 8) >> order) * cs;

  return (int64_t) covered - (int64_t) len;
}

int
fl_make_image_near_full (const char *path, const char *create_opts,
                         uint64_t size, uint64_t slack, uint64_t seed,
                         uint8_t *initial, uint8_t **file, size_t *file_len)
{
  uint64_t lo = 0, hi = size, dense = 0, best = 0;
  int64_t left, best_dist = INT64_MAX;
  uint32_t table0 = 0, table;
  int tries;

  /* Bisect on the size of the dense part: more data leaves less room,
   * until qemu-img makes the refcount table bigger, which must not
   * happen.
   */
  for (tries = 0; tries < 16; tries++) {
    int64_t dist;

    if (fl_make_image (path, create_opts, false, size, dense, seed, initial,
                       file, file_len) == -1)
      return -1;
    left = reftable_slack (*file, *file_len);
    table = get_be32 (*file + 56);
    free (*file);
    *file = NULL;
    if (tries == 0)
      table0 = table;
    dist = left > (int64_t) slack ? left - (int64_t) slack
                                  : (int64_t) slack - left;
    if (table == table0 && left >= 0 && dist < best_dist) {
      best_dist = dist;
      best = dense;
    }
    if (table == table0 && left >= (int64_t) slack / 2 &&
        left <= (int64_t) slack * 3 / 2)
      break;
    if (table == table0 && left > (int64_t) slack)
      lo = dense;
    else
      hi = dense;
    dense = (lo + hi) / 2;
  }
  if (tries == 16)
    fprintf (stderr, "note: %s has %" PRId64 " bytes, not about %" PRIu64
             ", left before its refcount table is full\n", path,
             best_dist + (int64_t) slack, slack);
  return fl_make_image (path, create_opts, false, size, best, seed, initial,
                        file, file_len);
}
