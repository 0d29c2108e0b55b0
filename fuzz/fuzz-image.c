/* nbdkit-qcow2: libFuzzer target for the mapping layer.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * The input is an image followed by a short list of operations:
 *
 *   image bytes | op[0] .. op[n-1] | flags (u8) | n (u8)
 *
 * n is the last byte modulo 16, and each op is 12 bytes:
 *
 *   u8 kind, u8 arg, u16 length (big-endian), u64 offset (big-endian)
 *
 * If the input is too short for its trailer, it is all image and there
 * are no ops.  The image is opened from memory with q2_open_io, then:
 *   - a scan: block status from offset 0 on, reading the start of each
 *     extent (so that seeds without ops reach every kind of cluster);
 *     what status calls zero must read as zeros;
 *   - each op.  kind % 8: 0 read, 1 block status, and on a writable
 *     image 2 write (bytes = arg; a write that works must read back),
 *     3 write zeroes (arg bit 1 may trim, bit 2 fast; if it works the
 *     range must read as zeros), 4 trim, 5 flush; 6-7 are reserved.
 *     The offset is taken modulo the virtual size; the length is
 *     length + 1 bytes, times 512 if arg bit 0 is set, clipped to the
 *     end of the disk and to 1 MiB.
 * Every read that works is checked against reads of its 512-byte
 * pieces (different mapping runs, merges and cache slices); a mismatch,
 * or a block status outside its request, aborts like a crash.
 * flags: bit 0 serves snapshot "1" instead of the active layer; bit 1
 * gives a 4 KiB L2 cache instead of 64 KiB (more evictions); bit 2
 * opens the image read-write (the in-memory copy grows as needed).
 *
 * The same file builds the replay driver for compilers without
 * libFuzzer (-DQ2_FUZZ_REPLAY_MAIN): it runs each file named on the
 * command line once.
 */

#include <config.h>

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"

#define OP_SIZE 12
#define MAX_OPS 15
#define MAX_IO (1024 * 1024)
#define SCAN_CALLS 64
#define SCAN_READ (64 * 1024)

enum { OP_READ, OP_STATUS, OP_WRITE, OP_ZERO, OP_TRIM, OP_FLUSH };

#define FLAG_SNAPSHOT 1
#define FLAG_TINY_CACHE 2
#define FLAG_WRITABLE 4

static int verbose;

static void
log_error (const char *msg)
{
  if (verbose)
    fprintf (stderr, "qcow2: %s\n", msg);
}

int LLVMFuzzerInitialize (int *argc, char ***argv);
int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

int
LLVMFuzzerInitialize (int *argc, char ***argv)
{
  verbose = getenv ("Q2_FUZZ_VERBOSE") != NULL;
  q2_set_log_hooks (log_error, NULL);
  return 0;
}

static uint8_t *
get_buf (unsigned which, uint64_t n)
{
  static uint8_t *bufs[2];

  if (bufs[which] == NULL)
    bufs[which] = malloc (MAX_IO);
  return n <= MAX_IO ? bufs[which] : NULL;
}

/* Read [off, off+len).  If that works, read its first VERIFY bytes
 * again in 512-byte pieces, which map and merge differently: every
 * piece must work and match.  If zero is set (block status said ZERO),
 * the data must be zeros.
 */
#define VERIFY 8192

static void
do_read (struct q2_image *img, uint64_t off, uint64_t len, bool zero)
{
  uint8_t *buf = get_buf (0, len), *piece = get_buf (1, 512);
  uint64_t i, n;

  if (buf == NULL || len == 0 || q2_read (img, buf, len, off) == -1)
    return;
  for (i = 0; i < len && i < VERIFY; i += n) {
    n = 512 - (off + i) % 512;
    if (n > len - i)
      n = len - i;
    if (q2_read (img, piece, n, off + i) == -1 ||
        memcmp (piece, buf + i, n) != 0) {
      fprintf (stderr, "fuzz: reading %" PRIu64 " bytes at %" PRIu64
               " differs from the read of %" PRIu64 " at %" PRIu64 "\n",
               n, off + i, len, off);
      abort ();
    }
  }
  if (zero) {
    for (i = 0; i < len; i++)
      if (buf[i]) {
        fprintf (stderr, "fuzz: block status said zero at %" PRIu64
                 "+%" PRIu64 ", but byte %" PRIu64 " is not\n",
                 off, len, off + i);
        abort ();
      }
  }
}

/* A write or zero that worked must read back as what was written. */
static void
do_write (struct q2_image *img, uint64_t off, uint64_t len, int kind,
          unsigned arg)
{
  uint8_t *buf = get_buf (0, len), *back = get_buf (1, len);
  unsigned zflags = (arg & 2 ? Q2_ZERO_MAY_TRIM : 0) |
                    (arg & 4 ? Q2_ZERO_FAST : 0);
  int r;

  if (buf == NULL || back == NULL || len == 0)
    return;
  memset (buf, kind == OP_WRITE ? arg : 0, len);
  r = kind == OP_WRITE ? q2_write (img, buf, len, off)
                       : q2_zero (img, len, off, zflags);
  if (r == -1 || q2_read (img, back, len, off) == -1)
    return;
  if (memcmp (buf, back, len) != 0) {
    fprintf (stderr, "fuzz: %s of %" PRIu64 " bytes at %" PRIu64
             " does not read back\n", kind == OP_WRITE ? "write" : "zero",
             len, off);
    abort ();
  }
}

/* Walk the status from off on, as a client would; every result must
 * be inside the request.  With read set, read the start of each extent.
 */
static void
do_status (struct q2_image *img, uint64_t off, uint64_t len, bool read)
{
  unsigned calls;

  for (calls = 0; calls < SCAN_CALLS && len > 0; calls++) {
    uint64_t n;
    unsigned flags;

    if (q2_block_status (img, off, len, &n, &flags) == -1)
      return;
    if (n == 0 || n > len || (flags & ~(Q2_STATUS_HOLE | Q2_STATUS_ZERO))) {
      fprintf (stderr, "fuzz: block status at %" PRIu64 "+%" PRIu64
               " returned length %" PRIu64 " flags %u\n", off, len, n, flags);
      abort ();
    }
    if (read)
      do_read (img, off, n < SCAN_READ ? n : SCAN_READ,
               flags & Q2_STATUS_ZERO);
    off += n;
    len -= n;
  }
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  struct q2_open_opts opts = { .readonly = true };
  struct q2_image *img;
  struct q2_io *io;
  size_t nops = 0, img_len = size, i;
  uint8_t flags = 0;
  uint64_t vsize;

  if (size >= 2) {
    size_t n = data[size - 1] % (MAX_OPS + 1);

    if (size >= 2 + n * OP_SIZE) {
      nops = n;
      flags = data[size - 2];
      img_len = size - 2 - n * OP_SIZE;
    }
  }
  opts.l2_cache_bytes = flags & FLAG_TINY_CACHE ? 4096 : 65536;
  if (flags & FLAG_SNAPSHOT)
    opts.snapshot = "1";
  opts.readonly = !(flags & FLAG_WRITABLE);
  /* Encrypted images get keyed (legacy AES) or their LUKS header
   * parsed and tried; the fuzz build caps PBKDF2 iterations.
   */
  opts.password = "fuzz";

  io = q2_io_mem_new ("fuzz.qcow2", data, img_len, opts.readonly);
  if (io == NULL)
    return 0;
  if (q2_open_io (io, &opts, &img) == -1) {
    q2_io_close (io);
    return 0;
  }
  vsize = q2_size (img);

  do_status (img, 0, vsize, true);

  for (i = 0; i < nops && vsize > 0; i++) {
    const uint8_t *op = data + img_len + i * OP_SIZE;
    unsigned kind = op[0] % 8, arg = op[1];
    uint64_t len = (uint64_t) get_be16 (op + 2) + 1;
    uint64_t off = get_be64 (op + 4) % vsize;

    if (arg & 1)
      len *= 512;
    if (len > vsize - off)
      len = vsize - off;
    if (len > MAX_IO)
      len = MAX_IO;
    switch (kind) {
    case OP_READ:
      do_read (img, off, len, false);
      break;
    case OP_STATUS:
      do_status (img, off, len, false);
      break;
    case OP_WRITE:
    case OP_ZERO:
      do_write (img, off, len, kind, arg);
      break;
    case OP_TRIM:
      q2_trim (img, len, off);
      break;
    case OP_FLUSH:
      q2_flush (img);
      break;
    default:                    /* reserved */
      break;
    }
  }
  q2_close (img);
  return 0;
}

#ifdef Q2_FUZZ_REPLAY_MAIN
/* Replay driver: run each input file once. */
int
main (int argc, char *argv[])
{
  int i, status = 0;

  LLVMFuzzerInitialize (&argc, &argv);
  for (i = 1; i < argc; i++) {
    FILE *f = fopen (argv[i], "rb");
    uint8_t *buf = NULL;
    size_t len = 0, cap = 0, r;

    if (f == NULL) {
      perror (argv[i]);
      status = 1;
      continue;
    }
    do {
      if (len == cap) {
        cap = cap ? cap * 2 : 65536;
        buf = realloc (buf, cap);
        if (buf == NULL) {
          perror ("realloc");
          exit (1);
        }
      }
      r = fread (buf + len, 1, cap - len, f);
      len += r;
    } while (r > 0);
    fclose (f);
    LLVMFuzzerTestOneInput (buf, len);
    free (buf);
    printf ("ok: %s (%zu bytes)\n", argv[i], len);
  }
  return status;
}
#endif
