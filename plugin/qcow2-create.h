/* nbdkit-qcow2: creating new images (create=true).
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Part of the layer: knows nothing of nbdkit.  The front ends parse
 * the options (qcow2-params.c), build the LUKS area if one is wanted,
 * and call q2_create before opening the image.
 */

#ifndef QCOW2_CREATE_H
#define QCOW2_CREATE_H

#include <stdbool.h>
#include <stdint.h>

enum q2_prealloc {
  Q2_PREALLOC_OFF = 0,
  Q2_PREALLOC_METADATA,         /* L2 tables and data clusters, sparse */
  Q2_PREALLOC_FALLOC,           /* ... and the data space fallocated */
  Q2_PREALLOC_FULL,             /* ... and the data space written */
};

struct q2_create_opts {
  uint64_t size;                /* virtual size; 0 with a backing file:
                                 * size_set says whether it was given */
  bool size_set;
  uint64_t cluster_size;        /* 0: 64K */
  unsigned version;             /* 2 (compat=0.10) or 3; 0: 3 */
  unsigned refcount_bits;       /* 0: 16 */
  bool extended_l2;
  bool lazy_refcounts;
  int compression_type;         /* QCOW2_COMPRESSION_* */
  enum q2_prealloc prealloc;
  const char *backing;          /* recorded as given; NULL: none */
  const char *backing_format;   /* "raw" or "qcow2"; needed with backing */
  const char *data_file;        /* created, and recorded as given */
  bool data_file_raw;
  unsigned crypt_method;        /* QCOW2_CRYPT_NONE, _AES or _LUKS */
  /* LUKS: the whole area (header and key material) ready to store;
   * luks_len is what the FDE extension records.
   */
  const uint8_t *luks_hdr;
  uint64_t luks_len;
};

/* Check the options (as qemu-img does), fill in the defaults and, with
 * a backing file and no size, read the size from the backing file.
 * Returns -1 after reporting what is wrong.
 */
extern int q2_create_check (struct q2_create_opts *o);

/* Create filename (and the data file), which must not exist, as one
 * atomic step: nothing is left behind on failure.  Calls
 * q2_create_check itself.
 */
extern int q2_create (const char *filename, const struct q2_create_opts *o);

#endif /* QCOW2_CREATE_H */
