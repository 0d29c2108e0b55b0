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
/* The front end's parameter prefix for messages (see q2_open_opts). */
#define Q2_PREFIX(opts) ((opts)->param_prefix ? (opts)->param_prefix : "")

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
  /* Optional, preferred to data_status: Q2_STATUS_* flags of the run
   * at off, as a server reports them (qcow2-nbd.c).
   */
  int (*status) (struct q2_io *io, uint64_t off, uint64_t n,
                 uint64_t *len, unsigned *flags);
  void (*close) (struct q2_io *io);
};

struct q2_io {
  const struct q2_io_ops *ops;
  char *name;                   /* for messages */
  bool readonly;
  dev_t dev;                    /* identity, for backing loop detection */
  /* The file cannot grow past its size (an nbdkit plugin's export):
   * allocate after the last refcounted cluster, not at the end.
   */
  bool fixed_size;
  ino_t ino;
  bool remote;                  /* on an NBD server (qcow2-nbd.c) */
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
  uint32_t nb_bitmaps;          /* from the bitmaps extension */
  uint64_t bitmap_dir_size, bitmap_dir_offset;
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
struct q2_meta_set;
struct q2_range { uint64_t off, len; };

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
  uint64_t snap_table_len;      /* bytes */
  const char *snapshot;         /* non-NULL if serving a snapshot */

  pthread_mutex_t lock;         /* metadata lock (write path) */

  /* Write state, set up by the first write (qcow2-write.c).  Every
   * field below is protected by lock.
   */
  bool write_started;
  bool bad_metadata;            /* the mapping found damage (atomic) */
  bool corrupt;                 /* inconsistency found: no more writes */
  bool lazy;                    /* lazy refcounts: dirty bit while open */
  unsigned refcount_bits;
  unsigned rb_bits;             /* log2 of refcounts per refcount block */
  uint64_t *reftable;           /* host-endian */
  uint64_t reftable_entries;
  uint64_t reftable_offset;
  struct q2_cache *rc_cache;    /* refcount blocks */
  uint64_t free_hint;           /* no free cluster below this index */
  uint64_t alloc_end;           /* cluster index past every allocation */
  struct q2_meta_set *meta;     /* clusters holding metadata */
  struct q2_range *pending;     /* frees waiting for a flush */
  size_t n_pending, cap_pending;
  uint64_t pending_done;        /* frees ever taken off the queue */
  struct q2_range *inflight;    /* guest ranges being allocated */
  size_t n_inflight, cap_inflight;
  pthread_cond_t inflight_cond;
  /* Data I/O holds this shared; applying frees holds it exclusive, so
   * no request still uses a cluster when it becomes reusable.
   */
  pthread_rwlock_t io_lock;

  /* Compressed writes (qcow2-write-compressed.c), under lock. */
  bool compress;                /* compress=true */
  uint64_t cpack_off;           /* next free byte of the packing area */
  uint64_t cpack_end;           /* its end (a cluster boundary); 0: none.
                                   Reset when its last cluster is freed. */
  enum q2_repair repair;        /* see q2_open_opts */
  bool check_failed;            /* repair=check found errors: no writes */
  /* Encryption (qcow2-encrypt.c): NULL for a plain image.  The cipher is
   * keyed once at open and shared read-only by every thread.
   */
  struct q2_crypto *crypt;
  bool crypt_host_iv;           /* LUKS: IV from the host sector */
  pthread_mutex_t rmw_lock;     /* serialises partial-sector writes */
};

/* ---- mapping (qcow2-map.c) ---- */
enum q2_kind { Q2_UNALLOC, Q2_ZERO, Q2_DATA, Q2_COMPRESSED };

struct q2_run {
  enum q2_kind kind;
  uint64_t len;                 /* bytes of guest data in the run */
  uint64_t host;                /* Q2_DATA: host offset of the first byte */
  uint64_t cdesc;               /* Q2_COMPRESSED: the L2 descriptor */
  bool copied;                  /* Q2_DATA: refcount 1, may write in place */
};

extern int q2_debug_map;

/* Map the longest simple run starting at offset, at most max bytes. */
extern int q2_map (struct q2_image *img, uint64_t offset, uint64_t max,
                   struct q2_run *run);

/* ---- compression (qcow2-compress.c) ---- */
extern int q2_decompress (int type, const void *src, size_t srclen,
                          void *dst, size_t dstlen);
/* A per-thread buffer of at least n bytes (which: 0 or 1, and 2 for
 * Q2_SCRATCH_CRYPT), kept for reuse by the same thread.
 */
#define Q2_SCRATCH_CRYPT 2
extern void *q2_scratch (unsigned which, size_t n);
/* Compress srclen bytes into at most dstcap bytes: 0 and *outlen on
 * success, 1 if the output does not fit, -1 on error.
 */
extern int q2_compress (int type, const void *src, size_t srclen, void *dst,
                        size_t dstcap, size_t *outlen);
/* The L2 entry (COMPRESSED flag included) of len bytes at host. */
extern uint64_t q2_cdesc_encode (unsigned cluster_bits, uint64_t host,
                                 uint64_t len);
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
  uint64_t entry_off;           /* file offset of the table entry */
  uint64_t entry_len;           /* its length without padding */
};
extern int q2_snapshot_load_table (struct q2_image *img);
extern void q2_snapshot_free_table (struct q2_image *img);
extern int q2_snapshot_select (struct q2_image *img, const char *id_or_name);
/* By ID first, then by name, as QEMU looks snapshots up; NULL if none. */
extern struct q2_snapshot *q2_snapshot_find (struct q2_image *img,
                                             const char *id_or_name);

/* ---- image (qcow2-image.c) ----
 * follow: open the backing and data files the image names.
 */
extern int q2_open_qcow2 (struct q2_io *io, const struct q2_open_opts *opts,
                          unsigned depth, struct q2_io **chain, bool follow,
                          struct q2_image **img_out);
extern int q2_open_raw (struct q2_io *io, struct q2_image **img_out);
/* Read and convert an L1 table (qcow2-file.c). */
extern int q2_load_l1 (struct q2_image *img, uint64_t offset, uint32_t size,
                       uint64_t **l1_out);

/* ---- refcounts (qcow2-refcount.c), all under img->lock ---- */
extern int q2_rc_init (struct q2_image *img);
extern void q2_rc_free (struct q2_image *img);
extern int q2_rc_get (struct q2_image *img, uint64_t cluster, uint64_t *rc);
extern int q2_rc_add (struct q2_image *img, uint64_t cluster, int delta);
extern int q2_rc_flush (struct q2_image *img);
/* The cluster index past the last cluster with a non-zero refcount. */
extern int q2_rc_used_end (struct q2_image *img, uint64_t *end);
/* Give refcount range r a block (growing the table if needed). */
extern int q2_rc_add_block (struct q2_image *img, uint64_t r);

/* ---- allocation (qcow2-alloc.c; q2_meta_* and q2_check_overlap in
 * qcow2-meta.c, q2_free_now in qcow2-refcount.c), all under img->lock ---- */
/* Up to n contiguous free clusters (at least one) with refcount 1. */
extern int q2_alloc_clusters (struct q2_image *img, uint64_t n,
                              uint64_t *host, uint64_t *got);
/* Drop one reference to each cluster of [off, off+len) now: only for
 * clusters nothing on disk points to.
 */
extern int q2_free_now (struct q2_image *img, uint64_t off, uint64_t len);
/* Append to a growable array of ranges. */
extern int q2_range_push (struct q2_image *img, struct q2_range **v,
                          size_t *n, size_t *cap, uint64_t off, uint64_t len);
/* Drop it once the removal of the pointer is on disk (at a flush). */
extern int q2_free_later (struct q2_image *img, uint64_t off, uint64_t len);
/* Apply the queued frees numbered below upto (counting every free ever
 * queued), so that concurrent flushes never apply one twice.
 */
extern int q2_apply_frees (struct q2_image *img, uint64_t upto);
extern int q2_meta_init (struct q2_image *img);
extern void q2_meta_free (struct q2_image *img);
extern int q2_meta_add (struct q2_image *img, uint64_t off, uint64_t len);
extern void q2_meta_remove (struct q2_image *img, uint64_t off);
/* Fail (and mark the image corrupt) if [off, off+len) holds metadata. */
extern int q2_check_overlap (struct q2_image *img, uint64_t off,
                             uint64_t len);

/* ---- persistent bitmaps (qcow2-bitmap.c) ---- */
/* Before the first write: flag every bitmap in use (inconsistent), as
 * we do not track dirty blocks.  Returns 0 if the bitmaps bit may stay.
 */
extern int q2_bitmaps_mark_in_use (struct q2_image *img);

/* ---- consistency check and refcount rebuild (qcow2-check.c) ---- */
struct q2_check_result {
  uint64_t leaks, errors, copied;       /* found, as qemu-img check counts */
  uint64_t leaks_past_end;      /* refcounts past the end of the file */
  uint64_t leaks_fixed, errors_fixed, copied_fixed;
  bool rc_damaged;              /* the refcount structures are damaged */
  bool rebuilt;                 /* new refcount structures were written */
  bool corrupt;                 /* real metadata corruption: no repair */
};
/* Count every reference to every cluster of the file and compare with
 * the refcounts on disk.  repair: fix what was found (img->lock held,
 * before the write state exists: refcounts are written directly, L2
 * entries through the L2 cache).  Fails on real metadata corruption
 * (res->corrupt) without writing anything.
 */
extern int q2_check (struct q2_image *img, bool repair,
                     struct q2_check_result *res);
extern void q2_check_report (struct q2_image *img,
                             const struct q2_check_result *res,
                             bool repaired);
/* At open (repair=check or all, image writable): check, report, and
 * refuse writes later if real corruption (or, for check, any error)
 * was found.  Never fails the open.
 */
extern void q2_check_at_open (struct q2_image *img);
/* Lock held, from the first write's setup: repair as img->repair says
 * and clear the dirty bit.
 */
extern int q2_check_before_write (struct q2_image *img);
#define Q2_SECTOR_SIZE 512

/* ---- encryption of guest data (qcow2-encrypt.c) ---- */
/* At open: key the image's cipher if it is encrypted (depth as for
 * q2_open_backing, to pick the password).
 */
extern int q2_crypt_open (struct q2_image *img,
                          const struct q2_open_opts *opts, unsigned depth);
extern void q2_crypt_close (struct q2_image *img);
/* In place; host and guest are the offsets of buf's first byte, and
 * len a multiple of 512.
 */
extern void q2_crypt_decrypt (struct q2_image *img, uint8_t *buf,
                              uint64_t len, uint64_t host, uint64_t guest);
/* Encrypt src into dst (may be equal). */
extern void q2_crypt_encrypt (struct q2_image *img, uint8_t *dst,
                              const uint8_t *src, uint64_t len,
                              uint64_t host, uint64_t guest);

/* ---- the image file, below the write path (qcow2-file.c) ---- */
extern int q2_mark_corrupt (struct q2_image *img);
/* Write to the image file and raise the known file size. */
extern int q2_write_file (struct q2_image *img, const void *buf, size_t n,
                          uint64_t off);
/* Write one big-endian header field. */
extern int q2_write_header_u64 (struct q2_image *img, unsigned field,
                                uint64_t v);

/* ---- writing (qcow2-write.c) ---- */
/* Reading without taking io_lock, for the write path's copy-on-write. */
extern int q2_finish_writes (struct q2_image *img);
extern int q2_read_nolock (struct q2_image *img, void *buf, uint64_t count,
                           uint64_t offset);
/* Look up the L2 table for a guest offset (0 if none), validating it. */
extern int q2_l1_lookup (struct q2_image *img, uint64_t offset,
                         uint64_t *l2_off);
extern int q2_write_l2_entry (struct q2_image *img, uint64_t l2_off,
                              uint64_t idx, uint64_t entry, uint64_t bitmap);
/* Lock held: the L2 table for guest, allocated or copied so that we
 * own it (for the compressed write path).
 */
extern int q2_ensure_l2 (struct q2_image *img, uint64_t guest,
                         uint64_t *l2_off);
/* Lock held: wait until no request allocates in [off, off+len), then
 * claim it; release it by its off.
 */
extern int q2_inflight_claim (struct q2_image *img, uint64_t off,
                              uint64_t len);
extern void q2_inflight_release (struct q2_image *img, uint64_t off);

/* ---- compressed writes (qcow2-write-compressed.c) ---- */
/* At open: refuse compress=true where it cannot work. */
extern int q2_compress_setup (struct q2_image *img,
                              const struct q2_open_opts *opts);
/* Every data write when compress=true; io_lock held shared. */
extern int q2_write_compressed (struct q2_image *img, const uint8_t *buf,
                                uint64_t count, uint64_t offset);
/* Set up the write state, as the first write does (lock not held). */
extern int q2_begin_write (struct q2_image *img);

#endif /* QCOW2_INTERNAL_H */
