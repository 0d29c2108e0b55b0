/* nbdkit-qcow2: parse and validate the qcow2 header and its extensions.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Every field is checked against the file size before anything else
 * uses it, so that later code may trust the parsed header.  Errors name
 * the file, the field and its offset in the header.
 */

#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"

#define BAD(...) Q2_FAIL (EINVAL, __VA_ARGS__)

int
q2_header_peek_cluster_size (const uint8_t *buf, size_t n, uint64_t *cs)
{
  uint32_t bits;

  if (n < QH_V2_LENGTH || get_be32 (buf + QH_MAGIC) != QCOW2_MAGIC)
    return -1;
  bits = get_be32 (buf + QH_CLUSTER_BITS);
  if (bits < QCOW2_MIN_CLUSTER_BITS || bits > QCOW2_MAX_CLUSTER_BITS)
    return -1;
  *cs = UINT64_C (1) << bits;
  return 0;
}

/* Is [off, off+len) inside a file of file_size bytes, without overflow? */
static bool
in_file (uint64_t off, uint64_t len, uint64_t file_size)
{
  return off <= file_size && len <= file_size - off;
}

static char *
dup_string (const uint8_t *p, size_t len)
{
  char *s = malloc (len + 1);

  if (s) {
    memcpy (s, p, len);
    s[len] = '\0';
  }
  return s;
}

/* The feature name table, kept only while parsing to name bad bits. */
struct features {
  const uint8_t *table;
  size_t n;
};

static void
name_feature (const struct features *ft, unsigned type, unsigned bit,
              char *out, size_t outlen)
{
  size_t i;

  for (i = 0; i < ft->n; i++) {
    const uint8_t *e = ft->table + i * QFEATURE_ENTRY_SIZE;
    if (e[0] == type && e[1] == bit) {
      snprintf (out, outlen, "%.46s", (const char *) e + 2);
      return;
    }
  }
  snprintf (out, outlen, "unknown feature bit %u", bit);
}

static int
check_incompat (const char *fname, uint64_t incompat,
                const struct features *ft)
{
  uint64_t unknown = incompat & ~QCOW2_INCOMPAT_KNOWN;
  char name[64];
  unsigned bit;

  if (unknown == 0)
    return 0;
  bit = __builtin_ctzll (unknown);
  name_feature (ft, QFEATURE_INCOMPAT, bit, name, sizeof name);
  return Q2_FAIL (ENOTSUP,
                  "%s: unsupported incompatible feature: %s "
                  "(incompatible_features bit %u, header offset %d)",
                  fname, name, bit, QH_INCOMPAT);
}

static int
parse_string_ext (const char *fname, const char *what, const uint8_t *p,
                  uint32_t len, uint64_t off, char **out)
{
  if (len == 0 || len > QCOW2_MAX_BACKING_NAME || memchr (p, 0, len))
    return BAD ("%s: invalid %s header extension at offset %" PRIu64
                " (length %" PRIu32 ")", fname, what, off, len);
  free (*out);
  *out = dup_string (p, len);
  return *out ? 0 : Q2_FAIL (ENOMEM, "%s: malloc: %m", fname);
}

/* Walk the header extensions in [start, end). */
static int
parse_extensions (const char *fname, const uint8_t *buf, uint64_t start,
                  uint64_t end, struct q2_header *h, struct features *ft)
{
  uint64_t off = start;

  while (off < end) {
    uint32_t magic, len;
    const uint8_t *data;

    if (end - off < 8)
      return BAD ("%s: truncated header extension at offset %" PRIu64,
                  fname, off);
    magic = get_be32 (buf + off);
    len = get_be32 (buf + off + 4);
    if (magic == QEXT_END)
      return 0;
    if (len > end - off - 8)
      return BAD ("%s: header extension 0x%08" PRIx32 " at offset %" PRIu64
                  " has length %" PRIu32 ", past the end of the header area",
                  fname, magic, off, len);
    data = buf + off + 8;
    switch (magic) {
    case QEXT_BACKING_FORMAT:
      if (parse_string_ext (fname, "backing format", data, len, off,
                            &h->backing_format) == -1)
        return -1;
      break;
    case QEXT_DATA_FILE:
      if (parse_string_ext (fname, "data file", data, len, off,
                            &h->data_file_name) == -1)
        return -1;
      break;
    case QEXT_FEATURE_TABLE:
      ft->table = data;
      ft->n = len / QFEATURE_ENTRY_SIZE;
      break;
    case QEXT_CRYPTO:
      if (len != 16)
        return BAD ("%s: encryption header extension at offset %" PRIu64
                    " has length %" PRIu32 ", expected 16", fname, off, len);
      h->crypto_offset = get_be64 (data);
      h->crypto_length = get_be64 (data + 8);
      break;
    case QEXT_BITMAPS:
      if (len >= 24) {
        h->nb_bitmaps = get_be32 (data);
        h->bitmap_dir_size = get_be64 (data + 8);
        h->bitmap_dir_offset = get_be64 (data + 16);
      }
      break;
    default:                    /* unknown ones: skip, and keep */
      break;
    }
    off += 8 + (((uint64_t) len + 7) & ~UINT64_C (7));
  }
  return 0;
}

static int
parse_fixed (const char *fname, const uint8_t *buf, size_t buflen,
             struct q2_header *h)
{
  if (buflen < 4 || get_be32 (buf + QH_MAGIC) != QCOW2_MAGIC)
    return BAD ("%s: not a qcow2 image (bad magic at offset 0)", fname);
  if (buflen < QH_V2_LENGTH)
    return BAD ("%s: file too short for a qcow2 header", fname);
  h->version = get_be32 (buf + QH_VERSION);
  if (h->version != 2 && h->version != 3)
    return Q2_FAIL (ENOTSUP, "%s: unsupported qcow2 version %" PRIu32
                    " at header offset %d", fname, h->version, QH_VERSION);
  h->cluster_bits = get_be32 (buf + QH_CLUSTER_BITS);
  if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
      h->cluster_bits > QCOW2_MAX_CLUSTER_BITS)
    return BAD ("%s: invalid cluster_bits %" PRIu32 " at header offset %d "
                "(must be 9 to 21)", fname, h->cluster_bits, QH_CLUSTER_BITS);
  h->size = get_be64 (buf + QH_SIZE);
  h->crypt_method = get_be32 (buf + QH_CRYPT_METHOD);
  h->l1_size = get_be32 (buf + QH_L1_SIZE);
  h->l1_offset = get_be64 (buf + QH_L1_OFFSET);
  h->reftable_offset = get_be64 (buf + QH_REFTABLE_OFFSET);
  h->reftable_clusters = get_be32 (buf + QH_REFTABLE_CLUSTERS);
  h->nb_snapshots = get_be32 (buf + QH_NB_SNAPSHOTS);
  h->snapshots_offset = get_be64 (buf + QH_SNAPSHOTS_OFFSET);

  if (h->version == 2) {
    h->refcount_order = 4;
    h->header_length = QH_V2_LENGTH;
    return 0;
  }
  if (buflen < QH_V3_MIN_LENGTH)
    return BAD ("%s: file too short for a version 3 header", fname);
  h->incompat = get_be64 (buf + QH_INCOMPAT);
  h->compat = get_be64 (buf + QH_COMPAT);
  h->autoclear = get_be64 (buf + QH_AUTOCLEAR);
  h->refcount_order = get_be32 (buf + QH_REFCOUNT_ORDER);
  h->header_length = get_be32 (buf + QH_HEADER_LENGTH);
  if (h->header_length < QH_V3_MIN_LENGTH || h->header_length % 8 ||
      h->header_length > (UINT32_C (1) << h->cluster_bits) ||
      h->header_length > buflen)
    return BAD ("%s: invalid header_length %" PRIu32 " at header offset %d",
                fname, h->header_length, QH_HEADER_LENGTH);
  if (h->header_length > QH_COMPRESSION_TYPE)
    h->compression_type = buf[QH_COMPRESSION_TYPE];
  return 0;
}

static int
check_features (const char *fname, const struct q2_header *h)
{
  bool has_ctype = h->incompat & QCOW2_INCOMPAT_COMPRESSION;

  if (h->refcount_order > 6)
    return BAD ("%s: invalid refcount_order %" PRIu32 " at header offset %d "
                "(must be 0 to 6)", fname, h->refcount_order,
                QH_REFCOUNT_ORDER);
  if (h->compression_type > QCOW2_COMPRESSION_ZSTD)
    return Q2_FAIL (ENOTSUP, "%s: unsupported compression type %u at "
                    "header offset %d", fname, h->compression_type,
                    QH_COMPRESSION_TYPE);
  if (has_ctype != (h->compression_type != QCOW2_COMPRESSION_DEFLATE))
    return BAD ("%s: compression type %u does not match the compression "
                "type feature bit", fname, h->compression_type);
  if ((h->incompat & QCOW2_INCOMPAT_EXTL2) &&
      h->cluster_bits < QCOW2_EXTL2_MIN_CLUSTER_BITS)
    return BAD ("%s: extended L2 entries need clusters of at least 16 KiB "
                "(cluster_bits is %" PRIu32 ")", fname, h->cluster_bits);
  switch (h->crypt_method) {
  case QCOW2_CRYPT_NONE:
    return 0;
  case QCOW2_CRYPT_AES:
  case QCOW2_CRYPT_LUKS:
    return 0;                   /* keyed in qcow2-encrypt.c */
  default:
    return BAD ("%s: invalid crypt_method %" PRIu32 " at header offset %d",
                fname, h->crypt_method, QH_CRYPT_METHOD);
  }
}

/* Tables: L1, refcount table, snapshot table, against the file size. */
static int
check_tables (const char *fname, const struct q2_header *h, uint64_t file_size)
{
  uint64_t cs = UINT64_C (1) << h->cluster_bits;
  unsigned l2e = h->incompat & QCOW2_INCOMPAT_EXTL2 ? 16 : 8;
  uint64_t per_l1 = cs * (cs / l2e);   /* guest bytes per L1 entry, ≤ 2^39 */
  uint64_t l1_needed;

  if (h->size > INT64_MAX - cs)
    return BAD ("%s: virtual size %" PRIu64 " at header offset %d is too "
                "large", fname, h->size, QH_SIZE);
  l1_needed = h->size / per_l1 + (h->size % per_l1 != 0);
  if (h->l1_size < l1_needed)
    return BAD ("%s: l1_size %" PRIu32 " at header offset %d is too small "
                "for virtual size %" PRIu64 " (need %" PRIu64 ")", fname,
                h->l1_size, QH_L1_SIZE, h->size, l1_needed);
  if ((uint64_t) h->l1_size * 8 > QCOW2_MAX_L1_BYTES)
    return BAD ("%s: l1_size %" PRIu32 " at header offset %d is too large",
                fname, h->l1_size, QH_L1_SIZE);
  if (h->l1_size > 0 &&
      (h->l1_offset % cs || h->l1_offset == 0 ||
       !in_file (h->l1_offset, (uint64_t) h->l1_size * 8, file_size)))
    return BAD ("%s: L1 table offset 0x%" PRIx64 " (header offset %d) is "
                "misaligned or outside the file", fname, h->l1_offset,
                QH_L1_OFFSET);
  if ((uint64_t) h->reftable_clusters * cs > QCOW2_MAX_REFTABLE_BYTES ||
      h->reftable_clusters == 0)
    return BAD ("%s: invalid refcount_table_clusters %" PRIu32
                " at header offset %d", fname, h->reftable_clusters,
                QH_REFTABLE_CLUSTERS);
  if (h->reftable_offset % cs || h->reftable_offset == 0 ||
      !in_file (h->reftable_offset, (uint64_t) h->reftable_clusters * cs,
                file_size))
    return BAD ("%s: refcount table offset 0x%" PRIx64 " (header offset %d) "
                "is misaligned or outside the file", fname,
                h->reftable_offset, QH_REFTABLE_OFFSET);
  if (h->nb_snapshots > QCOW2_MAX_SNAPSHOTS)
    return BAD ("%s: nb_snapshots %" PRIu32 " at header offset %d is too "
                "large", fname, h->nb_snapshots, QH_NB_SNAPSHOTS);
  if (h->nb_snapshots > 0 &&
      (h->snapshots_offset % cs || h->snapshots_offset == 0 ||
       !in_file (h->snapshots_offset,
                 (uint64_t) h->nb_snapshots * QSN_FIXED_SIZE, file_size)))
    return BAD ("%s: snapshot table offset 0x%" PRIx64 " (header offset %d) "
                "is misaligned or outside the file", fname,
                h->snapshots_offset, QH_SNAPSHOTS_OFFSET);
  return 0;
}

static int
parse_backing_name (const char *fname, const uint8_t *buf, uint64_t cs,
                    struct q2_header *h)
{
  uint64_t off = get_be64 (buf + QH_BACKING_OFFSET);
  uint32_t len = get_be32 (buf + QH_BACKING_SIZE);

  if (off == 0)
    return 0;
  if (len == 0 || len > QCOW2_MAX_BACKING_NAME)
    return BAD ("%s: invalid backing_file_size %" PRIu32 " at header "
                "offset %d (must be 1 to %d)", fname, len, QH_BACKING_SIZE,
                QCOW2_MAX_BACKING_NAME);
  if (off < h->header_length || off > cs || len > cs - off)
    return BAD ("%s: backing file name at offset %" PRIu64 " (header offset "
                "%d) is not inside the first cluster", fname, off,
                QH_BACKING_OFFSET);
  if (memchr (buf + off, 0, len))
    return BAD ("%s: backing file name at offset %" PRIu64 " contains a "
                "NUL byte", fname, off);
  h->backing_name = dup_string (buf + off, len);
  return h->backing_name ? 0 : Q2_FAIL (ENOMEM, "%s: malloc: %m", fname);
}

/* buf holds the first cluster (zero-padded past EOF); buflen is the
 * cluster size or less.
 */
int
q2_header_parse (const char *fname, const uint8_t *buf, size_t buflen,
                 uint64_t file_size, struct q2_header *h)
{
  struct features ft = { NULL, 0 };
  uint64_t cs, ext_end;

  memset (h, 0, sizeof *h);
  if (parse_fixed (fname, buf, buflen, h) == -1)
    return -1;
  cs = UINT64_C (1) << h->cluster_bits;
  if (buflen < cs)
    return BAD ("%s: header buffer shorter than a cluster", fname);
  if (parse_backing_name (fname, buf, cs, h) == -1)
    goto fail;
  ext_end = h->backing_name ? get_be64 (buf + QH_BACKING_OFFSET) : cs;
  if (parse_extensions (fname, buf, h->header_length, ext_end, h, &ft) == -1 ||
      check_incompat (fname, h->incompat, &ft) == -1 ||
      check_features (fname, h) == -1 ||
      check_tables (fname, h, file_size) == -1)
    goto fail;
  if ((h->incompat & QCOW2_INCOMPAT_DATA_FILE) == 0 && h->data_file_name) {
    free (h->data_file_name);           /* meaningless without the bit */
    h->data_file_name = NULL;
  }
  return 0;

 fail:
  q2_header_free (h);
  return -1;
}

void
q2_header_free (struct q2_header *h)
{
  free (h->backing_name);
  free (h->backing_format);
  free (h->data_file_name);
  h->backing_name = h->backing_format = h->data_file_name = NULL;
}
