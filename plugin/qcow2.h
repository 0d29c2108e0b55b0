/* nbdkit-qcow2: the qcow2 mapping layer's public interface.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * The layer knows nothing of nbdkit: the plugin, the unit tests and the
 * fuzzers all drive it through this header.  Every function that can
 * fail returns -1 with errno set, after reporting a message through
 * the error hook (see q2_set_log_hooks).  All calls on one image are
 * thread-safe.
 */

#ifndef QCOW2_H
#define QCOW2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct q2_image;
struct q2_io;

/* Longest backing chain we follow, counting the top image. */
#define Q2_MAX_CHAIN 32

/* Default L2 cache budget per image in bytes (capped at what covers
 * the whole disk).
 */
#define Q2_DEFAULT_L2_CACHE (32 * 1024 * 1024)

/* What to do about refcounts at open and at the first write (repair=). */
enum q2_repair {
  Q2_REPAIR_AUTO = 0,   /* rebuild a dirty (lazy refcounts) image */
  Q2_REPAIR_ALL,        /* full check at open; repair at the first write */
  Q2_REPAIR_OFF,        /* refuse to write a dirty image */
  Q2_REPAIR_CHECK,      /* full check at open; errors refuse writes */
};

struct q2_open_opts {
  const char *backing;        /* NULL: as the image says; "none": no backing */
  const char *backing_format; /* NULL: as the image says; "raw" or "qcow2" */
  const char *data_file;      /* NULL: as the image says */
  const char *snapshot;       /* NULL: active layer; else snapshot ID or name */
  uint64_t l2_cache_bytes;    /* 0: default */
  bool readonly;              /* open every file read-only */
  /* Secrets for encrypted images (NUL-terminated; never logged). */
  const char *password;         /* NULL: none given */
  const char *backing_password; /* NULL: use password */
  bool compress;              /* store every write as compressed clusters */
  enum q2_repair repair;        /* top image only */
  /* Follow NBD backing names found inside images (backing= is always
   * followed).
   */
  bool allow_remote_backing;
  /* The front end's parameter prefix, for messages ("qcow2-" in the
   * filter; NULL: none).
   */
  const char *param_prefix;
  /* q2_open_io: refuse an image that names a backing file unless
   * backing= overrides it (the filter: names in an image are paths on
   * some other machine).
   */
  bool explicit_backing;
};

/* Block status flags, with the same values as NBD's. */
#define Q2_STATUS_HOLE 1
#define Q2_STATUS_ZERO 2

/* Log hooks: error messages and debug messages.  Default: stderr
 * for errors, nothing for debug.
 */
typedef void (*q2_log_fn) (const char *msg);
extern void q2_set_log_hooks (q2_log_fn error, q2_log_fn debug);

extern int q2_open (const char *filename, const struct q2_open_opts *opts,
                    struct q2_image **img_out);
/* Open an image from an I/O object the caller made (tests, fuzzers).
 * On success the image owns io.  Backing and data files named in the
 * image are not opened unless opts names them.
 */
extern int q2_open_io (struct q2_io *io, const struct q2_open_opts *opts,
                       struct q2_image **img_out);
extern void q2_close (struct q2_image *img);

extern uint64_t q2_size (const struct q2_image *img);
extern bool q2_is_writable (const struct q2_image *img);
extern const char *q2_filename (const struct q2_image *img);
extern uint64_t q2_cluster_size (const struct q2_image *img);

/* Read count bytes of guest data at offset.  Any range inside the
 * virtual size is allowed.
 */
extern int q2_read (struct q2_image *img, void *buf, uint64_t count,
                    uint64_t offset);

/* Status of the run starting at offset: sets *len (> 0, ≤ count) and
 * *flags (Q2_STATUS_*).
 */
extern int q2_block_status (struct q2_image *img, uint64_t offset,
                            uint64_t count, uint64_t *len, unsigned *flags);

/* Writing.  q2_check_writable says why not (and reports it). */
#define Q2_ZERO_MAY_TRIM 1      /* the range may be deallocated */
#define Q2_ZERO_FAST 2          /* fail with ENOTSUP rather than write data */
extern int q2_check_writable (const struct q2_image *img);
extern int q2_write (struct q2_image *img, const void *buf, uint64_t count,
                     uint64_t offset);
extern int q2_zero (struct q2_image *img, uint64_t count, uint64_t offset,
                    unsigned flags);
extern int q2_trim (struct q2_image *img, uint64_t count, uint64_t offset);
/* Make every completed write durable, from every connection. */
extern int q2_flush (struct q2_image *img);

/* Internal snapshots, like qemu-img snapshot -c / -a / -d.  Only on an
 * image opened read-write on its active layer, before any request:
 * each call is crash-safe on its own and leaves everything flushed.
 */
extern int q2_snapshot_create (struct q2_image *img, const char *name);
extern int q2_snapshot_apply (struct q2_image *img, const char *id_or_name);
extern int q2_snapshot_delete (struct q2_image *img, const char *id_or_name);
/* Several, in order, after checking that every name and ID the list
 * refers to will exist (and no created name will be taken), so that a
 * bad list fails before the file is touched.
 */
enum { Q2_SNAP_CREATE, Q2_SNAP_APPLY, Q2_SNAP_DELETE };
struct q2_snapshot_op {
  int kind;                     /* Q2_SNAP_* */
  const char *arg;              /* name (create), ID or name */
};
extern int q2_snapshot_run (struct q2_image *img,
                            const struct q2_snapshot_op *ops, size_t n);

/* Cache statistics of the whole chain, through the debug hook. */
extern void q2_log_stats (struct q2_image *img);

/* Describe the build for --dump-plugin. */
extern const char *q2_features (void);

#endif /* QCOW2_H */
