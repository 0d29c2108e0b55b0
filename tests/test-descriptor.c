/* nbdkit-qcow2: decoding of compressed cluster descriptors.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * From the qcow2 specification: with x = 62 - (cluster_bits - 8), bits
 * 0..x-1 of the descriptor are the host byte offset of the compressed
 * data and bits x..61 the number of 512-byte sectors that follow the
 * sector holding that offset.  The data therefore runs from the offset
 * to the end of sector (offset / 512 + 1 + additional sectors).
 *
 * Every expectation below was worked out by hand from that text; the
 * arithmetic is in the comments.
 */

#include <config.h>

#include <stdio.h>
#include <stdlib.h>

#include "qcow2-internal.h"

struct dcase {
  unsigned cluster_bits;
  uint64_t desc;
  uint64_t host, len;           /* expected */
  const char *why;
};

static const struct dcase cases[] = {
  /* cluster_bits 9: x = 61.  Offset in bits 0..60, one sector bit (61). */
  { 9, 0x1000, 0x1000, 512,
    "offset 4096, 0 more sectors: one whole sector" },
  { 9, (UINT64_C (1) << 61) | 0x1234, 0x1234, 972,
    "offset 0x1234 (sector 0x1200 + 0x34), 1 more: 0x1600 - 0x1234 = 972" },
  { 9, (UINT64_C (1) << 61) - 1, (UINT64_C (1) << 61) - 1, 1,
    "largest offset, last byte of its sector: 1 byte" },
  { 9, UINT64_C (1) << 61, 0, 1024,
    "offset 0, 1 more sector: 1024 bytes" },
  { 9, UINT64_C (0x3fffffffffffffff), (UINT64_C (1) << 61) - 1, 513,
    "all 62 bits: largest offset (511 into its sector), 1 more: 1 + 512" },

  /* cluster_bits 16: x = 54.  Sector count in bits 54..61 (8 bits). */
  { 16, (UINT64_C (3) << 54) | 0x12345, 0x12345, 1723,
    "offset 0x12345 (0x145 into sector 0x12200), 3 more: "
    "0x12200 + 4*512 - 0x12345 = 0x6bb = 1723" },
  { 16, (UINT64_C (0xff) << 54) | 0x30000, 0x30000, 131072,
    "aligned offset, 255 more sectors: 256 * 512 = 2 clusters" },
  { 16, UINT64_C (1) << 54, 0, 1024,
    "bit 54 is the first sector-count bit, not an offset bit" },
  { 16, UINT64_C (1) << 53, UINT64_C (1) << 53, 512,
    "bit 53 is the top offset bit" },
  { 16, (UINT64_C (2) << 54) | 0x200001ff, 0x200001ff, 1025,
    "offset at the last byte of a sector, 2 more: 1 + 1024" },

  /* cluster_bits 21: x = 49.  Sector count in bits 49..61 (13 bits). */
  { 21, (UINT64_C (0x1fff) << 49) | 0x200000, 0x200000, 4194304,
    "8191 more sectors: 8192 * 512 = 4 MiB, twice the cluster size" },
  { 21, (UINT64_C (5) << 49) | ((UINT64_C (1) << 49) - 1),
    (UINT64_C (1) << 49) - 1, 2561,
    "largest offset (511 into its sector), 5 more: 1 + 5 * 512" },
  { 21, UINT64_C (1) << 49, 0, 1024,
    "bit 49 is the first sector-count bit" },
  { 21, (UINT64_C (1) << 48) | 0x100, (UINT64_C (1) << 48) | 0x100, 256,
    "bit 48 is the top offset bit; 0x100 into the sector: 256 bytes" },
};

int
main (void)
{
  size_t i;
  int failures = 0;

  for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const struct dcase *c = &cases[i];
    uint64_t host = 0xdead, len = 0xbeef;
    int flagged;

    /* Bits 62 and 63 of an L2 entry (compressed, copied) are not part
     * of the descriptor: decoding with them set must give the same.
     */
    for (flagged = 0; flagged <= 1; flagged++) {
      uint64_t d = c->desc | (flagged ? UINT64_C (3) << 62 : 0);

      q2_cdesc_decode (c->cluster_bits, d, &host, &len);
      if (host != c->host || len != c->len) {
        printf ("FAIL: cluster_bits %u desc 0x%016" PRIx64 ": got host 0x%"
                PRIx64 " len %" PRIu64 ", expected host 0x%" PRIx64
                " len %" PRIu64 " (%s)\n", c->cluster_bits, d, host, len,
                c->host, c->len, c->why);
        failures++;
      }
      else
        printf ("ok: cluster_bits %u desc 0x%016" PRIx64 " -> host 0x%"
                PRIx64 " len %" PRIu64 "\n", c->cluster_bits, d, host, len);
    }
  }
  if (failures) {
    printf ("%d descriptor check(s) failed\n", failures);
    return 1;
  }
  return 0;
}
