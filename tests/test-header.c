/* nbdkit-qcow2: header validation, one case per rule.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * A small builder writes valid version 2 and version 3 images into a
 * buffer (header, refcount table and block, L1, L2, one data cluster).
 * The base images must open and read back their data; when qemu-img is
 * installed it must also find them clean, so the builder is checked by
 * an independent implementation.  Each case then damages one field and
 * the open must fail, with an error message that names the file and
 * the problem.
 */

#include <config.h>

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qcow2-internal.h"

/* ---- captured messages ---- */

static char msgs[16384];

static void
capture (const char *msg)
{
  size_t n = strlen (msgs);

  snprintf (msgs + n, sizeof msgs - n, "%s\n", msg);
}

/* ---- the image builder ---- */

#define FEATURE_NAME_5 "test feature bit five"
#define DATA_BYTE 0xa5

struct img {
  uint8_t *buf;
  size_t len;
  unsigned version, cb;
  uint64_t cs;
  bool extl2;
  /* Where things went, so that cases can damage them. */
  uint64_t reftable, refblock, l1, l2, data;
  uint32_t l1_size;
  size_t ext_start, ext_end;    /* header extensions, end marker at ext_end */
};

static void
put_ext (struct img *im, uint32_t magic, const void *data, uint32_t len)
{
  uint8_t *p = im->buf + im->ext_end;

  put_be32 (p, magic);
  put_be32 (p + 4, len);
  memcpy (p + 8, data, len);
  im->ext_end += 8 + ((len + 7) & ~7U);
  /* The end marker: 8 zero bytes, already zero in the buffer. */
}

/* A valid image of the given version and cluster_bits with virtual
 * size `size`: clusters are header, refcount table, refcount block, L1
 * (as many clusters as it needs), one L2 table and one data cluster.
 * Guest cluster 0 maps to the data cluster, filled with DATA_BYTE.
 */
static void
build (struct img *im, unsigned version, unsigned cb, uint64_t size,
       bool extl2)
{
  uint64_t cs = UINT64_C (1) << cb;
  unsigned l2e = extl2 ? 16 : 8;
  uint64_t per_l1 = cs * (cs / l2e);
  uint32_t l1_size = size / per_l1 + (size % per_l1 != 0);
  uint64_t l1_clusters = ((uint64_t) l1_size * 8 + cs - 1) / cs;
  uint64_t nclusters = 3 + l1_clusters + 2, i;
  uint8_t *h;

  memset (im, 0, sizeof *im);
  im->version = version;
  im->cb = cb;
  im->cs = cs;
  im->extl2 = extl2;
  im->len = nclusters * cs;
  im->buf = calloc (1, im->len);
  if (im->buf == NULL) {
    perror ("calloc");
    exit (1);
  }
  im->reftable = cs;
  im->refblock = 2 * cs;
  im->l1 = 3 * cs;
  im->l2 = im->l1 + l1_clusters * cs;
  im->data = im->l2 + cs;
  im->l1_size = l1_size;

  h = im->buf;
  put_be32 (h + 0, 0x514649fb);                 /* "QFI\xfb" */
  put_be32 (h + 4, version);
  put_be32 (h + 20, cb);
  put_be64 (h + 24, size);
  put_be32 (h + 36, l1_size);
  put_be64 (h + 40, im->l1);
  put_be64 (h + 48, im->reftable);
  put_be32 (h + 56, 1);
  if (version == 3) {
    uint8_t table[3 * 48] = { 0 };

    put_be64 (h + 72, extl2 ? (1 << 4) : 0);
    put_be32 (h + 96, 4);                       /* 16-bit refcounts */
    put_be32 (h + 100, 112);
    im->ext_start = im->ext_end = 112;
    /* A feature name table naming two known bits and one unknown one. */
    table[0] = 0; table[1] = 0; strcpy ((char *) table + 2, "dirty bit");
    table[48] = 0; table[49] = 1; strcpy ((char *) table + 50, "corrupt bit");
    table[96] = 0; table[97] = 5;
    strcpy ((char *) table + 98, FEATURE_NAME_5);
    put_ext (im, 0x6803f857, table, sizeof table);
  }
  else
    im->ext_start = im->ext_end = 72;

  /* Refcount table -> block; every cluster in use has refcount 1. */
  put_be64 (im->buf + im->reftable, im->refblock);
  for (i = 0; i < nclusters; i++)
    put_be16 (im->buf + im->refblock + i * 2, 1);
  /* L1[0] -> L2, L2[0] -> data; both have refcount 1, so COPIED. */
  put_be64 (im->buf + im->l1, im->l2 | (UINT64_C (1) << 63));
  put_be64 (im->buf + im->l2, im->data | (UINT64_C (1) << 63));
  if (extl2)
    put_be64 (im->buf + im->l2 + 8, 0xffffffff);  /* all 32 allocated */
  memset (im->buf + im->data, DATA_BYTE, cs);
}

/* ---- opening ---- */

static int failures;

#define CHECK(cond, ...)                        \
  do {                                          \
    if (!(cond)) {                              \
      printf ("FAIL: ");                        \
      printf (__VA_ARGS__);                     \
      printf ("\n");                            \
      failures++;                               \
    }                                           \
  } while (0)

static int
open_mem (const char *name, const struct img *im, struct q2_image **out)
{
  struct q2_open_opts opts = { .readonly = true };
  struct q2_io *io = q2_io_mem_new (name, im->buf, im->len, true);
  int r;

  if (io == NULL) {
    perror ("q2_io_mem_new");
    exit (1);
  }
  msgs[0] = '\0';
  errno = 0;
  r = q2_open_io (io, &opts, out);
  if (r == -1)
    q2_io_close (io);           /* the caller keeps io on failure */
  return r;
}

/* The base image must open, have the right size and read back. */
static void
expect_ok (const char *name, const struct img *im, uint64_t size)
{
  struct q2_image *img;
  uint8_t *buf;
  uint64_t i;

  if (open_mem (name, im, &img) == -1) {
    CHECK (0, "%s: valid image refused: %s", name, msgs);
    return;
  }
  CHECK (q2_size (img) == size, "%s: size %" PRIu64 ", expected %" PRIu64,
         name, q2_size (img), size);
  buf = malloc (2 * im->cs);
  if (q2_read (img, buf, 2 * im->cs, 0) == -1)
    CHECK (0, "%s: read failed: %s", name, msgs);
  else {
    for (i = 0; i < 2 * im->cs; i++)
      if (buf[i] != (i < im->cs ? DATA_BYTE : 0))
        break;
    CHECK (i == 2 * im->cs, "%s: wrong data at guest offset %" PRIu64,
           name, i);
  }
  free (buf);
  q2_close (img);
  printf ("ok: %s opens and reads back\n", name);
}

/* A damaged image must be refused with a message naming the file and
 * containing keyword (case-insensitive).
 */
static void
expect_fail (const char *name, const struct img *im, const char *keyword)
{
  struct q2_image *img;

  if (open_mem (name, im, &img) == 0) {
    CHECK (0, "%s: damaged image was opened", name);
    q2_close (img);
    return;
  }
  CHECK (errno != 0, "%s: failed without setting errno", name);
  CHECK (strstr (msgs, name) != NULL,
         "%s: error message does not name the file: %s", name, msgs);
  CHECK (strcasestr (msgs, keyword) != NULL,
         "%s: error message does not mention '%s': %s", name, keyword, msgs);
  printf ("ok: %s refused: %s", name, msgs);
}

/* qemu-img check must find the builder's images clean. */
static void
qemu_check (const char *name, const struct img *im)
{
  char path[] = "test-header.XXXXXX";
  char cmd[256];
  int fd, r;

  if (system ("qemu-img --version >/dev/null 2>&1") != 0) {
    printf ("skip: qemu-img not installed, %s not cross-checked\n", name);
    return;
  }
  fd = mkstemp (path);
  if (fd == -1 || write (fd, im->buf, im->len) != (ssize_t) im->len) {
    perror (path);
    exit (1);
  }
  close (fd);
  snprintf (cmd, sizeof cmd, "qemu-img check -q -f qcow2 %s", path);
  r = system (cmd);
  unlink (path);
  CHECK (r == 0, "%s: qemu-img check says the builder's image is bad", name);
  if (r == 0)
    printf ("ok: %s is clean according to qemu-img check\n", name);
}

/* ---- the cases ---- */

#define V2 1
#define V3 2

enum width { W8 = 1, W16 = 2, W32 = 4, W64 = 8 };

struct field_case {
  const char *name;
  unsigned versions;
  unsigned off;
  enum width w;
  uint64_t value;
  const char *keyword;
};

#define CS 4096                 /* cluster size of the base images */
#define FILE_END (6 * CS)       /* their file size */

static const struct field_case field_cases[] = {
  { "bad-magic", V2|V3, 0, W32, 0x514649fa, "magic" },
  { "version-1", V2|V3, 4, W32, 1, "version" },
  { "version-4", V2|V3, 4, W32, 4, "version" },
  { "cluster-bits-8", V2|V3, 20, W32, 8, "cluster_bits" },
  { "cluster-bits-22", V2|V3, 20, W32, 22, "cluster_bits" },
  { "header-length-108", V3, 100, W32, 108, "header_length" },
  { "header-length-96", V3, 100, W32, 96, "header_length" },
  { "header-length-past-cluster", V3, 100, W32, CS + 8, "header_length" },
  { "refcount-order-7", V3, 96, W32, 7, "refcount_order" },
  { "unknown-incompat-bit-63", V3, 72, W64, UINT64_C (1) << 63, "bit 63" },
  { "compression-type-without-bit", V3, 104, W8, 1, "compression" },
  { "compression-bit-with-deflate", V3, 72, W64, 1 << 3, "compression" },
  { "extended-l2-small-clusters", V3, 72, W64, 1 << 4, "extended" },
  { "crypt-method-aes", V2|V3, 32, W32, 1, "AES" },
  { "crypt-method-luks", V2|V3, 32, W32, 2, "LUKS" },
  { "crypt-method-3", V2|V3, 32, W32, 3, "crypt_method" },
  { "l1-size-too-small", V2|V3, 36, W32, 7, "l1_size" },
  { "l1-size-0", V2|V3, 36, W32, 0, "l1_size" },
  { "l1-size-huge", V2|V3, 36, W32, 0xffffffff, "l1_size" },
  { "l1-size-over-limit", V2|V3, 36, W32, 4 * 1024 * 1024 + 1, "l1_size" },
  { "l1-offset-misaligned", V2|V3, 40, W64, 3 * CS + 8, "L1 table" },
  { "l1-offset-past-eof", V2|V3, 40, W64, 1000 * CS, "L1 table" },
  { "l1-offset-0", V2|V3, 40, W64, 0, "L1 table" },
  { "l1-offset-2^63", V2|V3, 40, W64, UINT64_C (1) << 63, "L1 table" },
  { "refcount-table-clusters-0", V2|V3, 56, W32, 0,
    "refcount_table_clusters" },
  { "refcount-table-clusters-huge", V2|V3, 56, W32, 0xffffffff,
    "refcount_table_clusters" },
  { "refcount-table-clusters-over-limit", V2|V3, 56, W32,
    8 * 1024 * 1024 / CS + 1, "refcount_table_clusters" },
  { "refcount-table-runs-past-eof", V2|V3, 56, W32, 6, "refcount table" },
  { "refcount-table-past-eof", V2|V3, 48, W64, 1000 * CS, "refcount table" },
  { "refcount-table-misaligned", V2|V3, 48, W64, CS + 512,
    "refcount table" },
  { "refcount-table-offset-wraps", V2|V3, 48, W64,
    UINT64_MAX - CS + 1, "refcount table" },
  { "nb-snapshots-too-large", V2|V3, 60, W32, 65537, "nb_snapshots" },
  { "nb-snapshots-huge", V2|V3, 60, W32, 0xffffffff, "nb_snapshots" },
  { "size-int64-max", V2|V3, 24, W64, INT64_MAX, "size" },
  { "size-2^63-cluster", V2|V3, 24, W64, (UINT64_C (1) << 63) - CS, "size" },
  { "size-uint64-max", V2|V3, 24, W64, UINT64_MAX, "size" },
  { "size-2^62", V2|V3, 24, W64, UINT64_C (1) << 62, "size" },
  { "size-one-byte-too-many", V2|V3, 24, W64, 16 * 1024 * 1024 + 1,
    "l1_size" },
};

static void
poke (uint8_t *p, enum width w, uint64_t v)
{
  switch (w) {
  case W8: *p = v; break;
  case W16: put_be16 (p, v); break;
  case W32: put_be32 (p, v); break;
  case W64: put_be64 (p, v); break;
  }
}

/* Cases that change more than one field. */
struct custom_case {
  const char *name;
  unsigned versions;
  void (*damage) (struct img *im);
  const char *keyword;
};

static void
d_named_incompat (struct img *im)
{
  put_be64 (im->buf + 72, get_be64 (im->buf + 72) | (1 << 5));
}

static void
d_zstd_type_unknown (struct img *im)
{
  put_be64 (im->buf + 72, 1 << 3);
  im->buf[104] = 2;
}

static void
d_l1_runs_past_eof (struct img *im)
{
  /* The last cluster of the file, with one entry more than fits. */
  put_be64 (im->buf + 40, im->len - im->cs);
  put_be32 (im->buf + 36, im->cs / 8 + 1);
}

static void
d_snapshots_past_eof (struct img *im)
{
  put_be32 (im->buf + 60, 1);
  put_be64 (im->buf + 64, 1000 * im->cs);
}

static void
d_snapshots_misaligned (struct img *im)
{
  put_be32 (im->buf + 60, 1);
  put_be64 (im->buf + 64, im->data + 8);
}

static void
d_snapshots_run_past_eof (struct img *im)
{
  /* 1000 entries of at least 40 bytes cannot fit in one cluster. */
  put_be32 (im->buf + 60, 1000);
  put_be64 (im->buf + 64, im->data);
}

static void
d_snapshots_offset_0 (struct img *im)
{
  put_be32 (im->buf + 60, 1);
  put_be64 (im->buf + 64, 0);
}

static void
set_backing (struct img *im, uint64_t off, const void *name, uint32_t len)
{
  put_be64 (im->buf + 8, off);
  put_be32 (im->buf + 16, len);
  if (off < im->cs)
    memcpy (im->buf + off, name, len < im->cs - off ? len : im->cs - off);
}

static void
d_backing_too_long (struct img *im)
{
  char name[1024];

  memset (name, 'b', sizeof name);
  set_backing (im, 512, name, sizeof name);
}

static void
d_backing_size_0 (struct img *im)
{
  set_backing (im, 512, "", 0);
}

static void
d_backing_crosses_cluster (struct img *im)
{
  set_backing (im, im->cs - 5, "base.qcow2", 10);
}

static void
d_backing_past_cluster (struct img *im)
{
  set_backing (im, 2 * im->cs, "base.qcow2", 10);
}

static void
d_backing_in_header (struct img *im)
{
  /* Bytes 1-3 of the magic: no NUL, but inside the header. */
  put_be64 (im->buf + 8, 1);
  put_be32 (im->buf + 16, 3);
}

static void
d_backing_huge_offset (struct img *im)
{
  set_backing (im, UINT64_MAX - 4, "x", 10);
}

static void
d_backing_nul (struct img *im)
{
  set_backing (im, 512, "base\0qcow2", 10);
}

static void
d_ext_length_past_end (struct img *im)
{
  uint8_t data[8] = { 0 };

  put_ext (im, 0x12345678, data, sizeof data);
  put_be32 (im->buf + im->ext_end - 16 + 4, 0xfffffff0);
}

static void
d_ext_length_just_past_cluster (struct img *im)
{
  uint8_t data[8] = { 0 };
  size_t at = im->ext_end;

  put_ext (im, 0x12345678, data, sizeof data);
  put_be32 (im->buf + at + 4, im->cs - at - 8 + 1);
}

static void
d_ext_length_past_backing (struct img *im)
{
  uint8_t data[8] = { 0 };
  size_t at = im->ext_end;

  /* The extensions end where the backing file name starts. */
  set_backing (im, 1024, "base.qcow2", 10);
  put_ext (im, 0x12345678, data, sizeof data);
  put_be32 (im->buf + at + 4, 1024 - at - 8 + 1);
}

static void
d_feature_table_past_end (struct img *im)
{
  put_be32 (im->buf + im->ext_start + 4, 0x7ffffff8);
}

static void
d_backing_format_empty (struct img *im)
{
  put_ext (im, 0xe2792aca, "", 0);
}

static void
d_backing_format_nul (struct img *im)
{
  put_ext (im, 0xe2792aca, "qc\0w2", 5);
}

static void
d_crypto_ext_short (struct img *im)
{
  uint8_t data[8] = { 0 };

  put_ext (im, 0x0537be77, data, sizeof data);
}

static const struct custom_case custom_cases[] = {
  { "unknown-incompat-bit-named", V3, d_named_incompat, FEATURE_NAME_5 },
  { "compression-type-2", V3, d_zstd_type_unknown, "compression" },
  { "l1-table-runs-past-eof", V2|V3, d_l1_runs_past_eof, "L1 table" },
  { "snapshot-table-past-eof", V2|V3, d_snapshots_past_eof,
    "snapshot table" },
  { "snapshot-table-misaligned", V2|V3, d_snapshots_misaligned,
    "snapshot table" },
  { "snapshot-table-runs-past-eof", V2|V3, d_snapshots_run_past_eof,
    "snapshot table" },
  { "snapshot-table-offset-0", V2|V3, d_snapshots_offset_0,
    "snapshot table" },
  { "backing-name-too-long", V2|V3, d_backing_too_long, "backing" },
  { "backing-name-size-0", V2|V3, d_backing_size_0, "backing" },
  { "backing-name-crosses-cluster", V2|V3, d_backing_crosses_cluster,
    "backing" },
  { "backing-name-past-cluster", V2|V3, d_backing_past_cluster, "backing" },
  { "backing-name-in-header", V2|V3, d_backing_in_header, "backing" },
  { "backing-name-offset-wraps", V2|V3, d_backing_huge_offset, "backing" },
  { "backing-name-nul", V2|V3, d_backing_nul, "NUL" },
  { "extension-length-past-end", V2|V3, d_ext_length_past_end,
    "extension" },
  { "extension-length-past-cluster", V2|V3, d_ext_length_just_past_cluster,
    "extension" },
  { "extension-length-past-backing-name", V2|V3, d_ext_length_past_backing,
    "extension" },
  { "feature-table-length-past-end", V3, d_feature_table_past_end,
    "extension" },
  { "backing-format-empty", V2|V3, d_backing_format_empty,
    "backing format" },
  { "backing-format-nul", V2|V3, d_backing_format_nul, "backing format" },
  { "crypto-extension-short", V2|V3, d_crypto_ext_short, "encryption" },
};

/* Valid variations that must still open. */
static void
good_backing (struct img *im)
{
  set_backing (im, 1024, "base.qcow2", 10);
  put_ext (im, 0xe2792aca, "qcow2", 5);
}

static void
good_zstd (struct img *im)
{
  put_be64 (im->buf + 72, 1 << 3);
  im->buf[104] = 1;
}

static void
good_unknown_ext (struct img *im)
{
  uint8_t data[20] = { 1, 2, 3 };

  put_ext (im, 0x12345678, data, sizeof data);
}

static void
good_refcount_order (struct img *im)
{
  /* 64-bit refcounts: one block entry per cluster, 8 bytes each. */
  uint64_t i;

  put_be32 (im->buf + 96, 6);
  memset (im->buf + im->refblock, 0, im->cs);
  for (i = 0; i < im->len / im->cs; i++)
    put_be64 (im->buf + im->refblock + i * 8, 1);
}

static void
good_snapshot_table (struct img *im)
{
  /* One snapshot entry, in a new cluster, sharing the active L1 table. */
  uint64_t at = im->len;
  uint8_t *p;

  im->buf = realloc (im->buf, im->len + im->cs);
  memset (im->buf + at, 0, im->cs);
  im->len += im->cs;
  p = im->buf + at;
  put_be64 (p + 0, im->l1);
  put_be32 (p + 8, im->l1_size);
  put_be16 (p + 12, 1);         /* id "1" */
  put_be16 (p + 14, 4);         /* name "snap" */
  memcpy (p + 40, "1snap", 5);
  put_be32 (im->buf + 60, 1);
  put_be64 (im->buf + 64, at);
}

static void
run_good (const char *name, unsigned version, unsigned cb, uint64_t size,
          bool extl2, void (*change) (struct img *))
{
  struct img im;
  char full[128];

  snprintf (full, sizeof full, "v%u-%s.qcow2", version, name);
  build (&im, version, cb, size, extl2);
  if (change)
    change (&im);
  expect_ok (full, &im, size);
  free (im.buf);
}

int
main (void)
{
  const uint64_t size = 16 * 1024 * 1024;
  unsigned v;
  size_t i;

  q2_set_log_hooks (capture, NULL);

  /* The base images, checked by us and by qemu-img. */
  for (v = 2; v <= 3; v++) {
    struct img im;
    char name[64];

    build (&im, v, 12, size, false);
    snprintf (name, sizeof name, "v%u-base.qcow2", v);
    qemu_check (name, &im);
    free (im.buf);
    run_good ("base", v, 12, size, false, NULL);
    run_good ("cluster-bits-9", v, 9, 1024 * 1024, false, NULL);
    run_good ("cluster-bits-21", v, 21, size, false, NULL);
    run_good ("backing-name", v, 12, size, false, good_backing);
    run_good ("unknown-extension", v, 12, size, false, good_unknown_ext);
    run_good ("snapshot-table", v, 12, size, false, good_snapshot_table);
  }
  run_good ("zstd", 3, 12, size, false, good_zstd);
  run_good ("refcount-order-6", 3, 12, size, false, good_refcount_order);
  run_good ("extended-l2-cluster-bits-14", 3, 14, size, true, NULL);
  {
    struct img im;

    build (&im, 3, 14, size, true);
    qemu_check ("v3-extended-l2.qcow2", &im);
    free (im.buf);
  }

  /* The backing file name is recorded as written. */
  {
    struct img im;
    struct q2_image *img;

    build (&im, 3, 12, size, false);
    good_backing (&im);
    if (open_mem ("backing.qcow2", &im, &img) == 0) {
      CHECK (img->h.backing_name &&
             strcmp (img->h.backing_name, "base.qcow2") == 0,
             "backing name not parsed");
      CHECK (img->h.backing_format &&
             strcmp (img->h.backing_format, "qcow2") == 0,
             "backing format not parsed");
      q2_close (img);
    }
    else
      CHECK (0, "backing.qcow2 refused: %s", msgs);
    free (im.buf);
  }

  /* One field at a time. */
  for (i = 0; i < sizeof field_cases / sizeof field_cases[0]; i++) {
    const struct field_case *c = &field_cases[i];

    for (v = 2; v <= 3; v++) {
      struct img im;
      char name[128];

      if (!(c->versions & (v == 2 ? V2 : V3)))
        continue;
      build (&im, v, 12, size, false);
      if (im.len != FILE_END) {
        fprintf (stderr, "builder: unexpected layout\n");
        exit (1);
      }
      poke (im.buf + c->off, c->w, c->value);
      snprintf (name, sizeof name, "v%u-%s.qcow2", v, c->name);
      expect_fail (name, &im, c->keyword);
      free (im.buf);
    }
  }

  /* Cases that need more than one change. */
  for (i = 0; i < sizeof custom_cases / sizeof custom_cases[0]; i++) {
    const struct custom_case *c = &custom_cases[i];

    for (v = 2; v <= 3; v++) {
      struct img im;
      char name[128];

      if (!(c->versions & (v == 2 ? V2 : V3)))
        continue;
      build (&im, v, 12, size, false);
      c->damage (&im);
      snprintf (name, sizeof name, "v%u-%s.qcow2", v, c->name);
      expect_fail (name, &im, c->keyword);
      free (im.buf);
    }
  }

  /* A file shorter than a header. */
  {
    struct img im;

    build (&im, 3, 12, size, false);
    im.len = 50;
    expect_fail ("truncated-header.qcow2", &im, "short");
    im.len = 0;
    expect_fail ("empty.qcow2", &im, "qcow2");
    free (im.buf);
  }

  if (failures) {
    printf ("%d check(s) failed\n", failures);
    return 1;
  }
  printf ("all header checks passed\n");
  return 0;
}
