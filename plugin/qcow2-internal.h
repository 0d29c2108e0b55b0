/* nbdkit-qcow2: structures shared by the files of the mapping layer.
 * SPDX-License-Identifier: BSD-3-Clause
 */

#ifndef QCOW2_INTERNAL_H
#define QCOW2_INTERNAL_H

#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "qcow2.h"
#include "qcow2-format.h"

/* ---- logging (qcow2-log.c) ---- */
extern void q2_error (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2)));
extern void q2_debug (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2)));
/* Report an error and return -1 with errno = err. */
#define Q2_FAIL(err, ...) \
  (q2_error (__VA_ARGS__), errno = (err), -1)

/* ---- file access (qcow2-io.c) ----
 * All file access goes through this small interface so that tests can
 * replace it (in-memory images, injected faults, power-loss replay).
 */
struct q2_io_ops {
  /* Full read; bytes past the end of the file read as zeros. */
  int (*pread) (struct q2_io *io, void *buf, size_t n, uint64_t off);
  int (*pwrite) (struct q2_io *io, const void *buf, size_t n, uint64_t off);
  int (*flush) (struct q2_io *io);
  int64_t (*size) (struct q2_io *io);
  /* Optional: is [off, off+n) backed by data?  Sets *len of the run. */
  int (*data_status) (struct q2_io *io, uint64_t off, uint64_t n,
                      uint64_t *len, bool *is_data);
  void (*close) (struct q2_io *io);
};

struct q2_io {
  const struct q2_io_ops *ops;
  char *name;                   /* for messages */
  bool readonly;
  dev_t dev;                    /* identity, for backing loop detection */
  ino_t ino;
};

extern struct q2_io *q2_io_file_open (const char *path, bool readonly);
/* In-memory file; the data is copied. */
extern struct q2_io *q2_io_mem_new (const char *name, const void *data,
                                    size_t len, bool readonly);
extern void q2_io_close (struct q2_io *io);
extern int q2_io_pread (struct q2_io *io, void *buf, size_t n, uint64_t off);
extern int64_t q2_io_size (struct q2_io *io);

/* ---- parsed header (qcow2-header.c) ---- */
struct q2_header {
  uint32_t version;
  uint32_t cluster_bits;
  uint64_t size;
  uint32_t crypt_method;
  uint32_t l1_size;
  uint64_t l1_offset;
  uint64_t reftable_offset;
  uint32_t reftable_clusters;
  uint32_t nb_snapshots;
  uint64_t snapshots_offset;
  uint64_t incompat, compat, autoclear;
  uint32_t refcount_order;
  uint32_t header_length;
  uint8_t compression_type;
  char *backing_name;           /* NULL if none */
  char *backing_format;         /* NULL if not recorded */
  char *data_file_name;         /* NULL if none */
  uint64_t crypto_offset, crypto_length;
};

/* Parse and validate the header in buf (the first cluster, or less if
 * the file is shorter) against the file size.
 */
extern int q2_header_parse (const char *fname, const uint8_t *buf,
                            size_t buflen, uint64_t file_size,
                            struct q2_header *h);
extern void q2_header_free (struct q2_header *h);
/* Size in bytes of the first cluster we must read to parse a header. */
extern int q2_header_peek_cluster_size (const uint8_t *buf, size_t n,
                                        uint64_t *cs);

/* ---- the image ---- */
struct q2_cache;

struct q2_image {
  char *filename;
  struct q2_io *io;             /* the image file */
  struct q2_io *data_io;        /* where guest data lives: io or data file */
  bool raw;                     /* a raw backing file, not qcow2 */
  bool readonly;
  uint64_t size;                /* virtual size */
  struct q2_header h;

  unsigned cluster_bits;
  uint64_t cluster_size;
  bool extl2;
  unsigned l2e_size;            /* 8, or 16 with extended L2 */
  unsigned l2_bits;             /* log2 of entries per L2 table */
  uint64_t subcluster_size;     /* == cluster_size without extended L2 */
  uint64_t file_size;           /* of io; grows as clusters are allocated */

  uint64_t *l1;                 /* host-endian, l1_size entries */
  uint32_t l1_size;
  uint64_t l1_offset;

  struct q2_cache *l2_cache;
  struct q2_image *backing;     /* NULL if none */
  struct q2_snapshot *snaps;    /* the snapshot table */
  uint32_t nb_snaps;
  const char *snapshot;         /* non-NULL if serving a snapshot */

  pthread_mutex_t lock;         /* metadata lock (write path) */
};

/* ---- mapping (qcow2-map.c) ---- */
enum q2_kind { Q2_UNALLOC, Q2_ZERO, Q2_DATA, Q2_COMPRESSED };

struct q2_run {
  enum q2_kind kind;
  uint64_t len;                 /* bytes of guest data in the run */
  uint64_t host;                /* Q2_DATA: host offset of the first byte */
  uint64_t cdesc;               /* Q2_COMPRESSED: the L2 descriptor */
};

extern int q2_debug_map;

/* Map the longest simple run starting at offset, at most max bytes. */
extern int q2_map (struct q2_image *img, uint64_t offset, uint64_t max,
                   struct q2_run *run);

/* ---- compression (qcow2-compress.c) ---- */
extern int q2_decompress (int type, const void *src, size_t srclen,
                          void *dst, size_t dstlen);
/* Host offset and byte length of a compressed cluster's data. */
extern void q2_cdesc_decode (unsigned cluster_bits, uint64_t desc,
                             uint64_t *host, uint64_t *len);

/* ---- backing and data files (qcow2-backing.c) ----
 * depth is the image's place in the chain (0 = top); chain[0..depth]
 * holds the files opened so far, for loop detection.  The caller's
 * overrides in opts apply to the top image only.
 */
extern int q2_open_backing (struct q2_image *img,
                            const struct q2_open_opts *opts,
                            unsigned depth, struct q2_io **chain);
extern int q2_open_data_file (struct q2_image *img,
                              const struct q2_open_opts *opts,
                              unsigned depth);

/* ---- snapshots (qcow2-snapshot.c) ---- */
struct q2_snapshot {
  uint64_t l1_offset;
  uint32_t l1_size;
  uint64_t disk_size;           /* the header's size if not recorded */
  char *id;
  char *name;
};
extern int q2_snapshot_load_table (struct q2_image *img);
extern void q2_snapshot_free_table (struct q2_image *img);
extern int q2_snapshot_select (struct q2_image *img, const char *id_or_name);

/* ---- image (qcow2-image.c) ----
 * follow: open the backing and data files the image names.
 */
extern int q2_open_qcow2 (struct q2_io *io, const struct q2_open_opts *opts,
                          unsigned depth, struct q2_io **chain, bool follow,
                          struct q2_image **img_out);
extern int q2_open_raw (struct q2_io *io, struct q2_image **img_out);
extern int q2_load_l1 (struct q2_image *img, uint64_t offset, uint32_t size,
                       uint64_t **l1_out);

#endif /* QCOW2_INTERNAL_H */
