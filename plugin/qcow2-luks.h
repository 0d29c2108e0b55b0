/* nbdkit-qcow2: the LUKS1 header inside a qcow2 image.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Parsing and validation (as cryptsetup does, with bounds so that a
 * crafted header cannot cost unbounded time or memory), unlocking with
 * a password, and building a fresh header for image creation.
 */

#ifndef QCOW2_LUKS_H
#define QCOW2_LUKS_H

#include <stdint.h>

struct q2_io;
struct q2_crypto;

/* The most PBKDF2 iterations accepted, for a key slot and for the
 * master-key digest.  qemu-img's default (2 s of PBKDF2) is far below.
 */
#ifndef Q2_LUKS_MAX_ITER         /* the fuzzer builds with a low one */
#define Q2_LUKS_MAX_ITER (UINT32_C (1) << 25)
#endif
#define Q2_LUKS_STRIPES 4000
#define Q2_LUKS_HEADER_SIZE 592
#define Q2_LUKS_MIN_ITER 1000
/* The largest LUKS area we accept (qemu-img's is about 2 MiB). */
#define Q2_MAX_LUKS_AREA (16 * 1024 * 1024)

/* Validate the LUKS area [off, off+len) of io and unlock it with
 * password: on success *out is the data cipher (IVs from the host
 * sector).  Errors name fname.
 */
extern int q2_luks_open (const char *fname, struct q2_io *io, uint64_t off,
                         uint64_t len, const char *password,
                         struct q2_crypto **out);

/* Header creation (for qemu-img create's encrypt.* options).  NULL
 * fields take qemu-img's defaults: aes-256, xts, plain64, sha256 for
 * ivgen_hash_alg (used by essiv only), sha256, and 2000 ms.
 */
struct q2_luks_params {
  const char *cipher_alg;       /* "aes-256", "twofish-128", "cast5-128" ... */
  const char *cipher_mode;      /* "xts", "cbc", "ecb", "ctr" */
  const char *ivgen_alg;        /* "plain", "plain64", "essiv" */
  const char *ivgen_hash_alg;
  const char *hash_alg;
  uint64_t iter_time_ms;        /* 0: 2000 */
};

/* Build a complete LUKS1 area (header and 8 key-slot areas, slot 0
 * active) for password: *hdr (malloc'd, free it) of *hdr_len bytes,
 * which is what the qcow2 full-disk-encryption extension records as
 * its length.  Returns -1 with errno set after reporting an error.
 */
extern int q2_luks_build_header (const char *password,
                                 const struct q2_luks_params *p,
                                 uint8_t **hdr, uint64_t *hdr_len);

#endif /* QCOW2_LUKS_H */
