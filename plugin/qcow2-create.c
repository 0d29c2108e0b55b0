/* nbdkit-qcow2: creating new images (create=true).
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * The layout follows qemu-img's: the header cluster, the refcount
 * table, the first refcount block, the L1 table, then (preallocation)
 * each L2 table followed by the data clusters it maps, then (LUKS) the
 * encryption area.  Clusters are handed out one after another;
 * whenever an allocation reaches past what the refcount blocks cover,
 * the next refcount block goes right after it.  Every cluster below
 * the end has refcount 1, so the blocks are easy to fill.
 *
 * The image is written into a temporary file in the same directory,
 * synced and renamed into place without replacing anything, so a
 * failure leaves nothing behind and an existing file is never touched.
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcow2-internal.h"
#include "qcow2-create.h"
#include "qcow2-nbd.h"

#define DEFAULT_CLUSTER_SIZE (64 * 1024)
#define V3_HEADER_LENGTH 112
/* qemu-img writes the feature name table only from 8K clusters up. */
#define FEATURE_TABLE_MIN_CLUSTER 8192

static bool
is_pow2 (uint64_t x)
{
  return x != 0 && (x & (x - 1)) == 0;
}

static unsigned
log2u (uint64_t x)
{
  unsigned n = 0;

  while ((UINT64_C (1) << n) < x)
    n++;
  return n;
}

/* Virtual size of the backing file (a file, or an NBD export), which
 * must exist and be of the given format.
 */
static int
backing_size (const char *name, const char *fmt, uint64_t *size)
{
  struct q2_io *io = q2_nbd_is_name (name) ? q2_io_nbd_open (name)
    : q2_io_file_open (name, true);
  int r = 0;

  if (io == NULL)
    return Q2_FAIL (errno, "backing file %s: cannot be opened: %m", name);
  if (strcmp (fmt, "raw") == 0) {
    int64_t n = q2_io_size (io);
    if (n == -1)
      r = -1;
    else
      *size = n;
  }
  else {
    uint8_t b[32];
    if (q2_io_pread (io, b, sizeof b, 0) == -1)
      r = -1;
    else if (get_be32 (b) != QCOW2_MAGIC)
      r = Q2_FAIL (EINVAL, "backing file %s is not a qcow2 image "
                   "(backing-format=qcow2)", name);
    else
      *size = get_be64 (b + QH_SIZE);
  }
  q2_io_close (io);
  return r;
}

static uint64_t
l2_entries (const struct q2_create_opts *o)
{
  return o->cluster_size / (o->extended_l2 ? 16 : 8);
}

int
q2_create_check (struct q2_create_opts *o)
{
  const char *v3only = NULL;

  if (o->version == 0)
    o->version = 3;
  if (o->version != 2 && o->version != 3)
    return Q2_FAIL (EINVAL, "compat must be 0.10 or 1.1");
  if (o->cluster_size == 0)
    o->cluster_size = DEFAULT_CLUSTER_SIZE;
  if (!is_pow2 (o->cluster_size) ||
      o->cluster_size < (1 << QCOW2_MIN_CLUSTER_BITS) ||
      o->cluster_size > (1 << QCOW2_MAX_CLUSTER_BITS))
    return Q2_FAIL (EINVAL, "cluster-size must be a power of two between "
                    "512 and 2M, not %" PRIu64, o->cluster_size);
  if (o->refcount_bits == 0)
    o->refcount_bits = 16;
  if (!is_pow2 (o->refcount_bits) || o->refcount_bits > 64)
    return Q2_FAIL (EINVAL, "refcount-bits must be a power of two no "
                    "greater than 64, not %u", o->refcount_bits);
  if (o->compression_type != QCOW2_COMPRESSION_DEFLATE &&
      o->compression_type != QCOW2_COMPRESSION_ZSTD)
    return Q2_FAIL (EINVAL, "unknown compression type %d",
                    o->compression_type);
  if (o->prealloc > Q2_PREALLOC_FULL)
    return Q2_FAIL (EINVAL, "unknown preallocation mode %d", o->prealloc);
  if (o->crypt_method > QCOW2_CRYPT_LUKS)
    return Q2_FAIL (EINVAL, "unknown encryption method %u", o->crypt_method);

  if (o->version == 2) {
    if (o->refcount_bits != 16)
      v3only = "refcount-bits other than 16";
    else if (o->lazy_refcounts)
      v3only = "lazy-refcounts";
    else if (o->extended_l2)
      v3only = "extended-l2";
    else if (o->compression_type != QCOW2_COMPRESSION_DEFLATE)
      v3only = "compression-type=zstd";
    else if (o->data_file)
      v3only = "data-file (an external data file)";
    if (v3only)
      return Q2_FAIL (EINVAL, "%s needs compat=1.1 (qcow2 version 3), "
                      "not compat=0.10", v3only);
  }
  if (o->extended_l2 &&
      o->cluster_size < (1 << QCOW2_EXTL2_MIN_CLUSTER_BITS))
    return Q2_FAIL (EINVAL, "extended-l2 needs a cluster-size of at "
                    "least 16K, not %" PRIu64, o->cluster_size);
  if (o->data_file_raw && !o->data_file)
    return Q2_FAIL (EINVAL, "data-file-raw=true needs data-file=");
  if (o->data_file_raw && o->backing)
    return Q2_FAIL (EINVAL, "a backing file and data-file-raw=true "
                    "cannot be used together");
  /* Preallocated clusters would hide the backing file, unless their
   * subclusters can stay unallocated.
   */
  if (o->backing && o->prealloc != Q2_PREALLOC_OFF && !o->extended_l2)
    return Q2_FAIL (EINVAL, "a backing file and preallocation= can only "
                    "be used together with extended-l2=true");
  if (o->backing && !o->backing_format)
    return Q2_FAIL (EINVAL, "backing=%s needs backing-format=raw|qcow2 "
                    "(formats are never probed)", o->backing);
  if (o->backing_format && !o->backing)
    return Q2_FAIL (EINVAL, "backing-format= needs backing= when "
                    "creating an image");
  if (o->backing && strlen (o->backing) > QCOW2_MAX_BACKING_NAME)
    return Q2_FAIL (EINVAL, "backing file name longer than %d bytes",
                    QCOW2_MAX_BACKING_NAME);
  if (o->backing && strcmp (o->backing_format, "raw") != 0 &&
      strcmp (o->backing_format, "qcow2") != 0)
    return Q2_FAIL (EINVAL, "backing-format must be raw or qcow2");

  /* The size: given, or the backing file's (which must exist). */
  if (o->backing) {
    uint64_t bsize;
    if (backing_size (o->backing, o->backing_format, &bsize) == -1)
      return -1;
    if (!o->size_set)
      o->size = bsize;
  }
  else if (!o->size_set)
    return Q2_FAIL (EINVAL, "size= is required to create an image "
                    "without a backing file");
  if (o->size > INT64_MAX - 511)
    return Q2_FAIL (EINVAL, "size %" PRIu64 " is too large", o->size);
  o->size = (o->size + 511) & ~UINT64_C (511);   /* as qemu-img does */

  {
    uint64_t span = o->cluster_size * l2_entries (o);
    uint64_t l1 = o->size / span + (o->size % span != 0);
    if (l1 > QCOW2_MAX_L1_BYTES / 8)
      return Q2_FAIL (EFBIG, "size %" PRIu64 " is too large for "
                      "cluster-size %" PRIu64 " (the L1 table would "
                      "exceed %d bytes)", o->size, o->cluster_size,
                      QCOW2_MAX_L1_BYTES);
  }
  return 0;
}

/* ---- layout ---- */

struct layout {
  uint64_t cs;
  uint64_t rb_entries;          /* refcounts per refcount block */
  uint64_t rt_clusters;
  uint64_t next;                /* first free cluster */
  uint64_t *rb;                 /* cluster of each refcount block */
  uint64_t nrb, cap_rb;
  uint64_t l1_cluster;          /* 0 if l1_size == 0 */
  uint32_t l1_size;
  uint64_t luks_cluster;
  bool prealloc;                /* L2 tables are allocated */
  uint64_t *l2;                 /* cluster of each L2 table */
  uint64_t *data;               /* first data cluster of each L2 table */
  uint64_t guest_clusters;
};

/* Give every cluster below next a refcount block.  Returns 1 if the
 * refcount table is too small for them.
 */
static int
lay_fix (struct layout *l)
{
  while (l->nrb * l->rb_entries < l->next) {
    if (l->nrb == l->cap_rb) {
      uint64_t cap = l->cap_rb ? 2 * l->cap_rb : 64;
      uint64_t *p = realloc (l->rb, cap * sizeof *p);
      if (p == NULL)
        return Q2_FAIL (errno, "realloc: %m");
      l->rb = p;
      l->cap_rb = cap;
    }
    l->rb[l->nrb++] = l->next++;
  }
  return l->nrb > l->rt_clusters * l->cs / 8 ? 1 : 0;
}

static int
lay_alloc (struct layout *l, uint64_t n, uint64_t *start)
{
  *start = l->next;
  l->next += n;
  return lay_fix (l);
}

/* Lay everything out with a refcount table of l->rt_clusters. */
static int
lay_try (struct layout *l, const struct q2_create_opts *o)
{
  uint64_t per_l2 = l2_entries (o);
  uint64_t i;
  int r;

  l->nrb = 0;
  l->next = 1 + l->rt_clusters;
  if ((r = lay_fix (l)) != 0)
    return r;
  l->l1_cluster = 0;
  if (l->l1_size > 0) {
    uint64_t n = ((uint64_t) l->l1_size * 8 + l->cs - 1) / l->cs;
    if ((r = lay_alloc (l, n, &l->l1_cluster)) != 0)
      return r;
  }
  for (i = 0; l->prealloc && i < l->l1_size; i++) {
    uint64_t n = l->guest_clusters - i * per_l2;
    if (n > per_l2)
      n = per_l2;
    if ((r = lay_alloc (l, 1, &l->l2[i])) != 0)
      return r;
    l->data[i] = 0;
    if (!o->data_file && (r = lay_alloc (l, n, &l->data[i])) != 0)
      return r;
  }
  /* qemu-img sets up encryption after preallocating. */
  if (o->crypt_method == QCOW2_CRYPT_LUKS) {
    uint64_t n = (o->luks_len + l->cs - 1) / l->cs;
    if ((r = lay_alloc (l, n, &l->luks_cluster)) != 0)
      return r;
  }
  return 0;
}

static void
lay_free (struct layout *l)
{
  free (l->rb);
  free (l->l2);
  free (l->data);
}

static int
lay_out (struct layout *l, const struct q2_create_opts *o)
{
  uint64_t span = o->cluster_size * l2_entries (o);
  int r;

  memset (l, 0, sizeof *l);
  l->cs = o->cluster_size;
  l->rb_entries = o->cluster_size * 8 / o->refcount_bits;
  l->l1_size = o->size / span + (o->size % span != 0);
  l->guest_clusters = o->size / l->cs + (o->size % l->cs != 0);
  /* qemu-img maps a raw data file from the start. */
  l->prealloc = o->prealloc != Q2_PREALLOC_OFF || o->data_file_raw;
  if (l->prealloc && l->l1_size > 0) {
    l->l2 = calloc (l->l1_size, sizeof *l->l2);
    l->data = calloc (l->l1_size, sizeof *l->data);
    if (l->l2 == NULL || l->data == NULL)
      return Q2_FAIL (errno, "calloc: %m");
  }
  l->rt_clusters = 1;
  while ((r = lay_try (l, o)) == 1) {
    /* Enough table entries for the blocks needed so far, and retry. */
    uint64_t need = (l->nrb * 8 + l->cs - 1) / l->cs;
    l->rt_clusters = need > l->rt_clusters ? need : l->rt_clusters + 1;
    if (l->rt_clusters * l->cs > QCOW2_MAX_REFTABLE_BYTES)
      return Q2_FAIL (EFBIG, "the image would need a refcount table "
                      "larger than %d bytes: use a larger cluster-size "
                      "or less preallocation", QCOW2_MAX_REFTABLE_BYTES);
  }
  return r;
}

/* ---- the header ---- */

static const struct {
  uint8_t type, bit;
  const char *name;
} feature_names[] = {
  { QFEATURE_INCOMPAT, 0, "dirty bit" },
  { QFEATURE_INCOMPAT, 1, "corrupt bit" },
  { QFEATURE_INCOMPAT, 2, "external data file" },
  { QFEATURE_INCOMPAT, 3, "compression type" },
  { QFEATURE_INCOMPAT, 4, "extended L2 entries" },
  { QFEATURE_COMPAT, 0, "lazy refcounts" },
  { QFEATURE_AUTOCLEAR, 0, "bitmaps" },
  { QFEATURE_AUTOCLEAR, 1, "raw external data" },
};
#define N_FEATURES (sizeof feature_names / sizeof feature_names[0])

/* Append an extension at *p; room is checked by the caller. */
static void
add_ext (uint8_t *buf, size_t *p, uint32_t type, const void *data,
         size_t len)
{
  put_be32 (buf + *p, type);
  put_be32 (buf + *p + 4, len);
  memcpy (buf + *p + 8, data, len);
  *p += 8 + ((len + 7) & ~(size_t) 7);
}

static size_t
ext_size (size_t len)
{
  return 8 + ((len + 7) & ~(size_t) 7);
}

static int
build_header (const char *fname, const struct q2_create_opts *o,
              const struct layout *l, uint8_t *buf)
{
  uint64_t incompat = 0, compat = 0, autoclear = 0;
  size_t p = o->version == 2 ? QH_V2_LENGTH : V3_HEADER_LENGTH;
  size_t need = p + 8;          /* and the end marker */
  size_t blen = o->backing ? strlen (o->backing) : 0;
  bool features = o->version >= 3 && l->cs >= FEATURE_TABLE_MIN_CLUSTER;

  if (o->backing)
    need += ext_size (strlen (o->backing_format)) + blen;
  if (o->data_file)
    need += ext_size (strlen (o->data_file));
  if (o->crypt_method == QCOW2_CRYPT_LUKS)
    need += ext_size (16);
  if (features)
    need += ext_size (N_FEATURES * QFEATURE_ENTRY_SIZE);
  if (need > l->cs)
    return Q2_FAIL (ENAMETOOLONG, "%s: the header with the backing and "
                    "data file names (%zu bytes) does not fit in one "
                    "cluster of %" PRIu64 " bytes", fname, need, l->cs);

  memset (buf, 0, l->cs);
  put_be32 (buf + QH_MAGIC, QCOW2_MAGIC);
  put_be32 (buf + QH_VERSION, o->version);
  put_be32 (buf + QH_CLUSTER_BITS, log2u (l->cs));
  put_be64 (buf + QH_SIZE, o->size);
  put_be32 (buf + QH_CRYPT_METHOD, o->crypt_method);
  put_be32 (buf + QH_L1_SIZE, l->l1_size);
  put_be64 (buf + QH_L1_OFFSET, l->l1_cluster * l->cs);
  put_be64 (buf + QH_REFTABLE_OFFSET, l->cs);
  put_be32 (buf + QH_REFTABLE_CLUSTERS, l->rt_clusters);
  if (o->version >= 3) {
    if (o->data_file)
      incompat |= QCOW2_INCOMPAT_DATA_FILE;
    if (o->compression_type != QCOW2_COMPRESSION_DEFLATE)
      incompat |= QCOW2_INCOMPAT_COMPRESSION;
    if (o->extended_l2)
      incompat |= QCOW2_INCOMPAT_EXTL2;
    if (o->lazy_refcounts)
      compat |= QCOW2_COMPAT_LAZY_REFCOUNTS;
    if (o->data_file_raw)
      autoclear |= QCOW2_AUTOCLEAR_DATA_RAW;
    put_be64 (buf + QH_INCOMPAT, incompat);
    put_be64 (buf + QH_COMPAT, compat);
    put_be64 (buf + QH_AUTOCLEAR, autoclear);
    put_be32 (buf + QH_REFCOUNT_ORDER, log2u (o->refcount_bits));
    put_be32 (buf + QH_HEADER_LENGTH, V3_HEADER_LENGTH);
    buf[QH_COMPRESSION_TYPE] = o->compression_type;
  }

  if (o->backing)
    add_ext (buf, &p, QEXT_BACKING_FORMAT, o->backing_format,
             strlen (o->backing_format));
  if (o->data_file)
    add_ext (buf, &p, QEXT_DATA_FILE, o->data_file, strlen (o->data_file));
  if (o->crypt_method == QCOW2_CRYPT_LUKS) {
    uint8_t fde[16];
    put_be64 (fde, l->luks_cluster * l->cs);
    put_be64 (fde + 8, o->luks_len);
    add_ext (buf, &p, QEXT_CRYPTO, fde, sizeof fde);
  }
  if (features) {
    uint8_t ft[N_FEATURES * QFEATURE_ENTRY_SIZE];
    size_t i;
    memset (ft, 0, sizeof ft);
    for (i = 0; i < N_FEATURES; i++) {
      ft[i * QFEATURE_ENTRY_SIZE] = feature_names[i].type;
      ft[i * QFEATURE_ENTRY_SIZE + 1] = feature_names[i].bit;
      memcpy (ft + i * QFEATURE_ENTRY_SIZE + 2, feature_names[i].name,
              strlen (feature_names[i].name));
    }
    add_ext (buf, &p, QEXT_FEATURE_TABLE, ft, sizeof ft);
  }
  p += 8;                       /* end of extensions (zeros) */
  if (o->backing) {
    put_be64 (buf + QH_BACKING_OFFSET, p);
    put_be32 (buf + QH_BACKING_SIZE, blen);
    memcpy (buf + p, o->backing, blen);
  }
  return 0;
}

/* ---- writing ---- */

struct tmpfile {
  char *tmp;                    /* temporary name, NULL once renamed */
  const char *final;
  int fd;
};

static int
write_all (struct tmpfile *f, const void *buf, size_t n, uint64_t off)
{
  const char *p = buf;

  while (n > 0) {
    ssize_t r = pwrite (f->fd, p, n, off);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return Q2_FAIL (errno, "%s: write at offset %" PRIu64 ": %m",
                      f->final, off);
    }
    p += r; n -= r; off += r;
  }
  return 0;
}

static int
write_zeros (struct tmpfile *f, uint64_t off, uint64_t len)
{
  static const size_t chunk = 1024 * 1024;
  void *z = calloc (1, chunk);
  int r = 0;

  if (z == NULL)
    return Q2_FAIL (errno, "calloc: %m");
  while (len > 0 && r == 0) {
    size_t n = len < chunk ? len : chunk;
    r = write_all (f, z, n, off);
    off += n; len -= n;
  }
  free (z);
  return r;
}

static int
extend (struct tmpfile *f, uint64_t off, uint64_t len, enum q2_prealloc mode)
{
  int e;

  if (len == 0)
    return 0;
  switch (mode) {
  case Q2_PREALLOC_FULL:
    return write_zeros (f, off, len);
  case Q2_PREALLOC_FALLOC:
    e = posix_fallocate (f->fd, off, len);
    if (e != 0)
      return Q2_FAIL (e, "%s: fallocate %" PRIu64 " bytes at offset %"
                      PRIu64 ": %s", f->final, len, off, strerror (e));
    return 0;
  default: {
    struct stat st;
    if (fstat (f->fd, &st) == -1)
      return Q2_FAIL (errno, "%s: fstat: %m", f->final);
    if ((uint64_t) st.st_size < off + len &&
        ftruncate (f->fd, off + len) == -1)
      return Q2_FAIL (errno, "%s: truncate to %" PRIu64 " bytes: %m",
                      f->final, off + len);
    return 0;
  }
  }
}

static int
tmp_open (struct tmpfile *f, const char *final)
{
  const char *slash = strrchr (final, '/');
  mode_t mask;

  f->final = final;
  f->fd = -1;
  f->tmp = malloc (strlen (final) + 16);
  if (f->tmp == NULL)
    return Q2_FAIL (errno, "malloc: %m");
  if (slash)
    sprintf (f->tmp, "%.*s/.%s.XXXXXX", (int) (slash - final), final,
             slash + 1);
  else
    sprintf (f->tmp, ".%s.XXXXXX", final);
  f->fd = mkostemp (f->tmp, O_CLOEXEC);
  if (f->fd == -1) {
    int e = errno;
    free (f->tmp);
    f->tmp = NULL;
    return Q2_FAIL (e, "%s: cannot create a temporary file beside it: %m",
                    final);
  }
  /* mkostemp makes 0600; give the file the usual 0666 & ~umask. */
  mask = umask (0);
  umask (mask);
  if (fchmod (f->fd, 0666 & ~mask) == -1)
    return Q2_FAIL (errno, "%s: chmod: %m", f->tmp);
  return 0;
}

/* Remove what is left of a failed creation. */
static void
tmp_discard (struct tmpfile *f)
{
  if (f->fd >= 0)
    close (f->fd);
  f->fd = -1;
  if (f->tmp)
    unlink (f->tmp);
  free (f->tmp);
  f->tmp = NULL;
}

static int
tmp_sync (struct tmpfile *f)
{
  if (fsync (f->fd) == -1)
    return Q2_FAIL (errno, "%s: fsync: %m", f->final);
  if (close (f->fd) == -1) {
    f->fd = -1;
    return Q2_FAIL (errno, "%s: close: %m", f->final);
  }
  f->fd = -1;
  return 0;
}

/* Rename into place, never replacing an existing file. */
static int
tmp_commit (struct tmpfile *f)
{
  if (renameat2 (AT_FDCWD, f->tmp, AT_FDCWD, f->final,
                 RENAME_NOREPLACE) == -1) {
    if (errno != EINVAL && errno != ENOSYS)
      return Q2_FAIL (errno, "%s: %m", f->final);
    /* No RENAME_NOREPLACE here: link fails too if the name exists. */
    if (link (f->tmp, f->final) == -1)
      return Q2_FAIL (errno, "%s: %m", f->final);
    unlink (f->tmp);
  }
  free (f->tmp);
  f->tmp = NULL;
  return 0;
}

static int
sync_dir (const char *final)
{
  const char *slash = strrchr (final, '/');
  char *dir = slash ? strndup (final, slash == final ? 1 : slash - final)
    : strdup (".");
  int fd, r = 0;

  if (dir == NULL)
    return Q2_FAIL (errno, "strdup: %m");
  fd = open (dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd == -1 || fsync (fd) == -1)
    r = Q2_FAIL (errno, "%s: fsync of the directory: %m", dir);
  if (fd >= 0)
    close (fd);
  free (dir);
  return r;
}

/* One refcount block: every cluster below l->next has refcount 1. */
static void
fill_refblock (const struct layout *l, unsigned bits, uint64_t i,
               uint8_t *buf)
{
  uint64_t first = i * l->rb_entries, j, n;

  memset (buf, 0, l->cs);
  n = l->next > first ? l->next - first : 0;
  if (n > l->rb_entries)
    n = l->rb_entries;
  for (j = 0; j < n; j++) {
    switch (bits) {
    case 64: put_be64 (buf + j * 8, 1); break;
    case 32: put_be32 (buf + j * 4, 1); break;
    case 16: put_be16 (buf + j * 2, 1); break;
    case 8: buf[j] = 1; break;
    default:                    /* sub-byte widths pack LSB first */
      buf[j * bits / 8] |= 1 << (j * bits % 8);
    }
  }
}

static int
write_image (struct tmpfile *f, struct tmpfile *df,
             const struct q2_create_opts *o, const struct layout *l)
{
  uint64_t cs = l->cs, i, per_l2 = l2_entries (o);
  unsigned esize = o->extended_l2 ? 16 : 8;
  uint8_t *buf = malloc (cs);
  int r = -1;

  if (buf == NULL)
    return Q2_FAIL (errno, "malloc: %m");
  if (build_header (f->final, o, l, buf) == -1 ||
      write_all (f, buf, cs, 0) == -1)
    goto out;

  /* Refcount table, then blocks. */
  for (i = 0; i < l->rt_clusters; i++) {
    uint64_t j;
    memset (buf, 0, cs);
    for (j = 0; j < cs / 8 && i * (cs / 8) + j < l->nrb; j++)
      put_be64 (buf + j * 8, l->rb[i * (cs / 8) + j] * cs);
    if (write_all (f, buf, cs, (1 + i) * cs) == -1)
      goto out;
  }
  for (i = 0; i < l->nrb; i++) {
    fill_refblock (l, o->refcount_bits, i, buf);
    if (write_all (f, buf, cs, l->rb[i] * cs) == -1)
      goto out;
  }

  /* L1, written in pieces of a cluster; exactly l1_size entries. */
  for (i = 0; i < l->l1_size; i += cs / 8) {
    uint64_t n = l->l1_size - i, j;
    if (n > cs / 8)
      n = cs / 8;
    memset (buf, 0, cs);
    if (l->prealloc)
      for (j = 0; j < n; j++)
        put_be64 (buf + j * 8, (l->l2[i + j] * cs) | QCOW_OFLAG_COPIED);
    if (write_all (f, buf, n * 8, l->l1_cluster * cs + i * 8) == -1)
      goto out;
  }

  /* The LUKS area, zero-filled to its last cluster. */
  if (o->crypt_method == QCOW2_CRYPT_LUKS) {
    uint64_t off = l->luks_cluster * cs;
    uint64_t end = (o->luks_len + cs - 1) / cs * cs;
    if (write_all (f, o->luks_hdr, o->luks_len, off) == -1 ||
        write_zeros (f, off + o->luks_len, end - o->luks_len) == -1)
      goto out;
  }

  /* Preallocation: L2 tables and their data clusters. */
  if (l->prealloc) {
    for (i = 0; i < l->l1_size; i++) {
      uint64_t n = l->guest_clusters - i * per_l2, j;
      if (n > per_l2)
        n = per_l2;
      memset (buf, 0, cs);
      for (j = 0; j < n; j++) {
        uint64_t host = o->data_file ? (i * per_l2 + j) * cs
          : (l->data[i] + j) * cs;
        /* qemu-img leaves the subcluster bitmap at 0 (unallocated). */
        put_be64 (buf + j * esize, host | QCOW_OFLAG_COPIED);
      }
      if (write_all (f, buf, cs, l->l2[i] * cs) == -1)
        goto out;
      /* Like qemu-img, the file ends with the last subcluster of guest
       * data (anything allocated after it is written in full).
       */
      if (!o->data_file) {
        uint64_t len = n * cs;
        if (i == l->l1_size - 1) {
          uint64_t sub = o->extended_l2 ? cs / QCOW2_SUBCLUSTERS : cs;
          uint64_t tail = o->size - (l->guest_clusters - 1) * cs;
          len = (n - 1) * cs + (tail + sub - 1) / sub * sub;
        }
        if (extend (f, l->data[i] * cs, len, o->prealloc) == -1)
          goto out;
      }
    }
  }

  if (df) {
    enum q2_prealloc m = o->prealloc;
    if (m == Q2_PREALLOC_OFF)
      m = Q2_PREALLOC_METADATA;   /* just the size, sparse */
    if (extend (df, 0, o->size, m) == -1)
      goto out;
  }
  r = 0;
 out:
  free (buf);
  return r;
}

int
q2_create (const char *filename, const struct q2_create_opts *opts)
{
  struct q2_create_opts o = *opts;
  struct layout l;
  struct tmpfile f = { .fd = -1 }, df = { .fd = -1 };
  struct stat st;
  bool data_done = false;

  if (q2_create_check (&o) == -1)
    return -1;
  if (o.crypt_method == QCOW2_CRYPT_LUKS &&
      (o.luks_hdr == NULL || o.luks_len == 0))
    return Q2_FAIL (EINVAL, "%s: no LUKS header was built", filename);
  if (lstat (filename, &st) == 0)
    return Q2_FAIL (EEXIST, "%s: already exists; create=true never "
                    "replaces a file", filename);
  if (o.data_file && lstat (o.data_file, &st) == 0)
    return Q2_FAIL (EEXIST, "data file %s already exists; create=true "
                    "never replaces a file", o.data_file);
  if (lay_out (&l, &o) == -1) {
    lay_free (&l);
    return -1;
  }

  if (tmp_open (&f, filename) == -1 ||
      (o.data_file && tmp_open (&df, o.data_file) == -1) ||
      write_image (&f, o.data_file ? &df : NULL, &o, &l) == -1 ||
      (o.data_file && tmp_sync (&df) == -1) ||
      tmp_sync (&f) == -1 ||
      (o.data_file && tmp_commit (&df) == -1))
    goto fail;
  data_done = o.data_file != NULL;
  if (tmp_commit (&f) == -1)
    goto fail;
  lay_free (&l);
  if (sync_dir (filename) == -1 ||
      (o.data_file && sync_dir (o.data_file) == -1))
    return -1;
  q2_debug ("created %s: size %" PRIu64 ", cluster size %" PRIu64
            ", %" PRIu64 " clusters", filename, o.size, l.cs, l.next);
  return 0;

 fail:
  {
    int e = errno;
    if (data_done)
      unlink (o.data_file);
    tmp_discard (&df);
    tmp_discard (&f);
    lay_free (&l);
    errno = e;
  }
  return -1;
}
