/* nbdkit-qcow2 test helper: overwrite the LUKS area of a qcow2 image
 * with a header built by q2_luks_build_header for a new password.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * usage: luks-build IMAGE PASSWORD CIPHER MODE IVGEN IVHASH HASH
 * ("-" for a default).  The LUKS area is found through the qcow2
 * full-disk-encryption header extension; the built header must have
 * exactly the area's length.  Then the area is unlocked again with
 * q2_luks_open: the new password must work and a wrong one must not.
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qcow2-internal.h"
#include "qcow2-crypto.h"
#include "qcow2-luks.h"

static const char *
arg (const char *s)
{
  return strcmp (s, "-") == 0 ? NULL : s;
}

static void
die (const char *msg)
{
  fprintf (stderr, "luks-build: %s\n", msg);
  exit (1);
}

int
main (int argc, char **argv)
{
  struct q2_luks_params p = { 0 };
  uint8_t head[65536], *hdr;
  uint64_t off = 0, len = 0, hdr_len, pos;
  uint32_t hl;
  struct q2_io *io;
  struct q2_crypto *c;
  int fd;

  if (argc != 8)
    die ("usage: luks-build IMAGE PASSWORD CIPHER MODE IVGEN IVHASH HASH");
  p.cipher_alg = arg (argv[3]);
  p.cipher_mode = arg (argv[4]);
  p.ivgen_alg = arg (argv[5]);
  p.ivgen_hash_alg = arg (argv[6]);
  p.hash_alg = arg (argv[7]);
  p.iter_time_ms = 10;

  fd = open (argv[1], O_RDWR);
  if (fd == -1 || pread (fd, head, sizeof head, 0) < 4096)
    die ("cannot read the image");
  hl = get_be32 (head + QH_VERSION) == 2 ? QH_V2_LENGTH
       : get_be32 (head + QH_HEADER_LENGTH);
  for (pos = hl; pos + 8 <= sizeof head; ) {
    uint32_t magic = get_be32 (head + pos), elen = get_be32 (head + pos + 4);

    if (magic == 0)
      break;
    if (magic == QEXT_CRYPTO) {
      off = get_be64 (head + pos + 8);
      len = get_be64 (head + pos + 16);
    }
    pos += 8 + ((elen + 7) & ~7u);
  }
  if (len == 0)
    die ("no full-disk-encryption header extension");
  if (q2_luks_build_header (argv[2], &p, &hdr, &hdr_len) == -1)
    die ("q2_luks_build_header failed");
  if (hdr_len != len) {
    fprintf (stderr, "luks-build: built %" PRIu64 " bytes, the area is %"
             PRIu64 "\n", hdr_len, len);
    exit (1);
  }
  if (pwrite (fd, hdr, hdr_len, off) != (ssize_t) hdr_len || fsync (fd) == -1)
    die ("write failed");
  free (hdr);
  close (fd);

  io = q2_io_file_open (argv[1], true);
  if (io == NULL)
    die ("cannot reopen");
  if (q2_luks_open (argv[1], io, off, len, argv[2], &c) == -1)
    die ("the new password does not unlock the built header");
  q2_crypto_free (c);
  if (q2_luks_open (argv[1], io, off, len, "not the password", &c) == 0)
    die ("a wrong password unlocks the built header");
  q2_io_close (io);
  printf ("luks-build: wrote a %" PRIu64 "-byte LUKS area at 0x%" PRIx64 "\n",
          len, off);
  return 0;
}
