/* nbdkit-qcow2: on-disk constants of the qcow2 format.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Written from the qcow2 specification (QEMU docs/interop/qcow2.txt).
 * Every field is big-endian.
 */

#ifndef QCOW2_FORMAT_H
#define QCOW2_FORMAT_H

#include <stdint.h>
#include <string.h>
#include <endian.h>

#define QCOW2_MAGIC 0x514649fbU          /* "QFI\xfb" */

/* Header field offsets. */
#define QH_MAGIC                 0
#define QH_VERSION               4
#define QH_BACKING_OFFSET        8
#define QH_BACKING_SIZE         16
#define QH_CLUSTER_BITS         20
#define QH_SIZE                 24
#define QH_CRYPT_METHOD         32
#define QH_L1_SIZE              36
#define QH_L1_OFFSET            40
#define QH_REFTABLE_OFFSET      48
#define QH_REFTABLE_CLUSTERS    56
#define QH_NB_SNAPSHOTS         60
#define QH_SNAPSHOTS_OFFSET     64
#define QH_V2_LENGTH            72
#define QH_INCOMPAT             72
#define QH_COMPAT               80
#define QH_AUTOCLEAR            88
#define QH_REFCOUNT_ORDER       96
#define QH_HEADER_LENGTH       100
#define QH_COMPRESSION_TYPE    104
#define QH_V3_MIN_LENGTH       104

/* Feature bits. */
#define QCOW2_INCOMPAT_DIRTY      (1ULL << 0)
#define QCOW2_INCOMPAT_CORRUPT    (1ULL << 1)
#define QCOW2_INCOMPAT_DATA_FILE  (1ULL << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ULL << 3)
#define QCOW2_INCOMPAT_EXTL2      (1ULL << 4)
#define QCOW2_INCOMPAT_KNOWN      0x1fULL
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ULL << 0)
#define QCOW2_AUTOCLEAR_BITMAPS   (1ULL << 0)
#define QCOW2_AUTOCLEAR_DATA_RAW  (1ULL << 1)

#define QCOW2_COMPRESSION_DEFLATE 0
#define QCOW2_COMPRESSION_ZSTD    1

#define QCOW2_CRYPT_NONE 0
#define QCOW2_CRYPT_AES  1
#define QCOW2_CRYPT_LUKS 2

/* Header extensions. */
#define QEXT_END              0x00000000U
#define QEXT_BACKING_FORMAT   0xe2792acaU
#define QEXT_FEATURE_TABLE    0x6803f857U
#define QEXT_BITMAPS          0x23852875U
#define QEXT_CRYPTO           0x0537be77U
#define QEXT_DATA_FILE        0x44415441U
#define QFEATURE_ENTRY_SIZE   48
#define QFEATURE_INCOMPAT     0
#define QFEATURE_COMPAT       1
#define QFEATURE_AUTOCLEAR    2

/* Bitmap directory entries. */
#define QBM_FLAGS            12
#define QBM_NAME_SIZE        18
#define QBM_EXTRA_SIZE       20
#define QBM_FIXED_SIZE       24
#define QBM_FLAG_IN_USE      1U
#define QBM_MAX_DIR_BYTES    (64 * 1024 * 1024)

/* L1 and L2 entries. */
#define QCOW_OFLAG_COPIED      (1ULL << 63)
#define QCOW_OFLAG_COMPRESSED  (1ULL << 62)
#define QCOW_OFLAG_ZERO        (1ULL << 0)
#define L1E_OFFSET_MASK        0x00fffffffffffe00ULL
#define L1E_RESERVED_MASK      0x7f000000000001ffULL
#define L2E_OFFSET_MASK        0x00fffffffffffe00ULL
#define L2E_STD_RESERVED_MASK  0x3f000000000001feULL
#define L2E_EXT_RESERVED_MASK  0x3f000000000001ffULL /* bit 0 too */
#define REFT_OFFSET_MASK       0xfffffffffffffe00ULL

#define QCOW2_SUBCLUSTERS      32
#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_EXTL2_MIN_CLUSTER_BITS 14

/* Limits taken from what QEMU will itself create or open. */
#define QCOW2_MAX_L1_BYTES        (32 * 1024 * 1024)
#define QCOW2_MAX_REFTABLE_BYTES  (8 * 1024 * 1024)
#define QCOW2_MAX_SNAPSHOTS       65536
#define QCOW2_MAX_BACKING_NAME    1023
#define QCOW2_MAX_SNAPSHOT_EXTRA  1024

/* Snapshot table entry. */
#define QSN_L1_OFFSET        0
#define QSN_L1_SIZE          8
#define QSN_ID_LEN          12
#define QSN_NAME_LEN        14
#define QSN_DATE_SEC        16
#define QSN_DATE_NSEC       20
#define QSN_VM_CLOCK        24
#define QSN_VM_STATE_SIZE   32
#define QSN_EXTRA_SIZE      36
#define QSN_FIXED_SIZE      40
#define QSN_EXTRA_DISK_SIZE  8  /* within the extra data */

static inline uint16_t get_be16 (const void *p)
{ uint16_t v; memcpy (&v, p, 2); return be16toh (v); }
static inline uint32_t get_be32 (const void *p)
{ uint32_t v; memcpy (&v, p, 4); return be32toh (v); }
static inline uint64_t get_be64 (const void *p)
{ uint64_t v; memcpy (&v, p, 8); return be64toh (v); }
static inline void put_be16 (void *p, uint16_t v)
{ v = htobe16 (v); memcpy (p, &v, 2); }
static inline void put_be32 (void *p, uint32_t v)
{ v = htobe32 (v); memcpy (p, &v, 4); }
static inline void put_be64 (void *p, uint64_t v)
{ v = htobe64 (v); memcpy (p, &v, 8); }

#endif /* QCOW2_FORMAT_H */
