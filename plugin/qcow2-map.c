/* nbdkit-qcow2: map guest offsets to runs of host data.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * q2_map returns the longest run of one kind that starts at a guest
 * offset and stays inside one L2 slice: unallocated, zero, host data
 * contiguous on the host, or one compressed cluster.  Every L1 and L2
 * entry is validated when it is used, so damaged tables give an error
 * naming the file offset of the entry, never a wild read.
 */

#include <config.h>

#include <errno.h>
#include <string.h>

#include "qcow2-internal.h"
#include "qcow2-cache.h"

int q2_debug_map;

/* Damaged metadata: fail the request, and let the write path know, so
 * that it stops writing (see finish() in qcow2-write.c).
 */
#define CORRUPT(...) \
  (__atomic_store_n (&((struct q2_image *) img)->bad_metadata, true, \
                     __ATOMIC_RELEASE), \
   Q2_FAIL (EIO, __VA_ARGS__))

/* Largest number of entries one slice can hold (4 KiB of 8-byte entries). */
#define MAX_SLICE_ENTRIES 512

static uint64_t
file_size_now (const struct q2_image *img)
{
  return __atomic_load_n (&img->file_size, __ATOMIC_ACQUIRE);
}

/* Where a data cluster may start: inside the image file, or anywhere in
 * an external data file (which may be sparse or shorter).
 */
static int
check_host_cluster (const struct q2_image *img, uint64_t host,
                    uint64_t entry_off, const char *what)
{
  if (host & (img->cluster_size - 1))
    return CORRUPT ("%s: %s at file offset %" PRIu64 " points to unaligned "
                    "host offset 0x%" PRIx64, img->filename, what,
                    entry_off, host);
  if (img->data_io == img->io && host >= file_size_now (img))
    return CORRUPT ("%s: %s at file offset %" PRIu64 " points to host "
                    "offset 0x%" PRIx64 ", beyond the end of the file",
                    img->filename, what, entry_off, host);
  return 0;
}

static int
check_cdesc (const struct q2_image *img, uint64_t desc, uint64_t entry_off)
{
  uint64_t host, len, limit;

  if (img->data_io != img->io)
    return CORRUPT ("%s: compressed cluster in an image with an external "
                    "data file (L2 entry at file offset %" PRIu64 ")",
                    img->filename, entry_off);
  q2_cdesc_decode (img->cluster_bits, desc, &host, &len);
  /* QEMU counts whole sectors, so the last one may run past EOF. */
  limit = (file_size_now (img) + 511) & ~UINT64_C (511);
  if (host == 0 || host >= limit || len > limit - host)
    return CORRUPT ("%s: compressed cluster at host offset 0x%" PRIx64
                    " length %" PRIu64 " (L2 entry at file offset %" PRIu64
                    ") runs past the end of the file", img->filename,
                    host, len, entry_off);
  return 0;
}

/* The run that one cluster's entry gives from byte `in` of the cluster
 * (for extended L2, up to the first subcluster of another kind).
 */
static int
classify (const struct q2_image *img, const uint8_t *e, uint64_t entry_off,
          uint64_t in, struct q2_run *r)
{
  uint64_t l2e = get_be64 (e);
  uint64_t host = l2e & L2E_OFFSET_MASK;
  /* Only an external data file may hold a cluster at host offset 0. */
  bool ext_data = img->data_io != img->io;

  r->len = img->cluster_size - in;
  if (l2e & QCOW_OFLAG_COMPRESSED) {
    if (img->extl2 && get_be64 (e + 8) != 0)
      return CORRUPT ("%s: compressed cluster with a non-zero subcluster "
                      "bitmap (L2 entry at file offset %" PRIu64 ")",
                      img->filename, entry_off);
    r->kind = Q2_COMPRESSED;
    r->cdesc = l2e & ~(QCOW_OFLAG_COPIED | QCOW_OFLAG_COMPRESSED);
    return check_cdesc (img, r->cdesc, entry_off);
  }
  if (l2e & (img->extl2 ? L2E_EXT_RESERVED_MASK : L2E_STD_RESERVED_MASK))
    return CORRUPT ("%s: L2 entry at file offset %" PRIu64 " has reserved "
                    "bits set (0x%016" PRIx64 ")", img->filename, entry_off,
                    l2e);

  if (img->extl2) {
    uint64_t bitmap = get_be64 (e + 8);
    uint32_t alloc = bitmap, zero = bitmap >> 32;
    unsigned sc = in / img->subcluster_size, last;
    uint32_t bit = UINT32_C (1) << sc;

    if (alloc & zero)
      return CORRUPT ("%s: subcluster both allocated and zero (L2 entry at "
                      "file offset %" PRIu64 ")", img->filename, entry_off);
    if (alloc && ((host == 0 && !ext_data) ||
                  check_host_cluster (img, host, entry_off, "L2 entry") == -1))
      return host == 0 ? CORRUPT ("%s: allocated subclusters without a host "
                                  "cluster (L2 entry at file offset %" PRIu64
                                  ")", img->filename, entry_off) : -1;
    r->kind = alloc & bit ? Q2_DATA : zero & bit ? Q2_ZERO : Q2_UNALLOC;
    for (last = sc + 1; last < QCOW2_SUBCLUSTERS; last++) {
      uint32_t b = UINT32_C (1) << last;
      enum q2_kind k = alloc & b ? Q2_DATA : zero & b ? Q2_ZERO : Q2_UNALLOC;
      if (k != r->kind)
        break;
    }
    r->len = last * img->subcluster_size - in;
    r->host = host + in;
    r->copied = (l2e & QCOW_OFLAG_COPIED) || ext_data;
    return 0;
  }

  if ((l2e & QCOW_OFLAG_ZERO) && img->h.version < 3)
    return CORRUPT ("%s: L2 entry at file offset %" PRIu64 " has the zero "
                    "flag (reserved in version 2 images) set", img->filename,
                    entry_off);
  if (l2e & QCOW_OFLAG_ZERO)
    r->kind = Q2_ZERO;
  else if (host == 0 && !(ext_data && (l2e & QCOW_OFLAG_COPIED)))
    r->kind = Q2_UNALLOC;
  else {
    r->kind = Q2_DATA;
    r->host = host + in;
    r->copied = (l2e & QCOW_OFLAG_COPIED) || ext_data;
    return check_host_cluster (img, host, entry_off, "L2 entry");
  }
  return 0;
}

/* Find the L2 table for guest offset; *l2_off is 0 if there is none. */
int
q2_l1_lookup (struct q2_image *img, uint64_t offset, uint64_t *l2_off)
{
  uint64_t idx = offset >> (img->cluster_bits + img->l2_bits);
  uint64_t l1e, entry_off = img->l1_offset + idx * 8;

  if (idx >= img->l1_size)
    return CORRUPT ("%s: guest offset %" PRIu64 " is beyond the L1 table",
                    img->filename, offset);
  l1e = __atomic_load_n (&img->l1[idx], __ATOMIC_ACQUIRE);
  if (l1e & L1E_RESERVED_MASK)
    return CORRUPT ("%s: L1 entry at file offset %" PRIu64 " has reserved "
                    "bits set (0x%016" PRIx64 ")", img->filename, entry_off,
                    l1e);
  *l2_off = l1e & L1E_OFFSET_MASK;
  if (*l2_off == 0)
    return 0;
  if (*l2_off & (img->cluster_size - 1) ||
      *l2_off >= file_size_now (img) ||
      img->cluster_size > file_size_now (img) - *l2_off)
    return CORRUPT ("%s: L1 entry at file offset %" PRIu64 " points to L2 "
                    "table at 0x%" PRIx64 ", which is misaligned or past the "
                    "end of the file", img->filename, entry_off, *l2_off);
  return 0;
}

static bool
extends (const struct q2_run *run, const struct q2_run *next)
{
  if (next->kind != run->kind || run->kind == Q2_COMPRESSED)
    return false;
  return run->kind != Q2_DATA ||
         (next->host == run->host + run->len && next->copied == run->copied);
}

int
q2_map (struct q2_image *img, uint64_t offset, uint64_t max,
        struct q2_run *run)
{
  uint8_t ents[MAX_SLICE_ENTRIES * 8];
  uint64_t l2_off, in, idx, slice_entries, n, i, entry_off;
  uint64_t table_span = UINT64_C (1) << (img->cluster_bits + img->l2_bits);

  if (max > table_span - offset % table_span)
    max = table_span - offset % table_span;
  if (q2_l1_lookup (img, offset, &l2_off) == -1)
    return -1;
  if (l2_off == 0) {
    run->kind = Q2_UNALLOC;
    run->len = max;
    return 0;
  }

  /* The entries from offset's cluster to the end of its slice or of max. */
  idx = (offset >> img->cluster_bits) & ((UINT64_C (1) << img->l2_bits) - 1);
  in = offset & (img->cluster_size - 1);
  slice_entries = q2_cache_slice_size (img->l2_cache) / img->l2e_size;
  n = slice_entries - idx % slice_entries;
  if (n > (in + max + img->cluster_size - 1) >> img->cluster_bits)
    n = (in + max + img->cluster_size - 1) >> img->cluster_bits;
  entry_off = l2_off + idx * img->l2e_size;
  if (q2_cache_read (img->l2_cache, entry_off, ents, n * img->l2e_size) == -1)
    return -1;

  if (classify (img, ents, entry_off, in, run) == -1)
    return -1;
  for (i = 1; i < n && run->len < max; i++) {
    struct q2_run next;

    if (run->len != img->cluster_size * i - in)
      break;                    /* an extended L2 run ended mid-cluster */
    if (classify (img, ents + i * img->l2e_size,
                  entry_off + i * img->l2e_size, 0, &next) == -1)
      return -1;
    if (!extends (run, &next))
      break;
    run->len += next.len;
  }
  if (run->len > max)
    run->len = max;
  if (q2_debug_map)
    q2_debug ("map: guest %" PRIu64 "+%" PRIu64 " kind %d host 0x%" PRIx64,
              offset, run->len, run->kind,
              run->kind == Q2_DATA ? run->host : 0);
  return 0;
}
