/* nbdkit-qcow2: create an image through q2_create with a LUKS area
 * taken from a file, for test-create-layout.sh.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * usage: create-luks-area OUT.qcow2 SIZE AREA-FILE [OPTION...]
 * OPTION: cluster-size=N, compat=0.10, preallocation=metadata.  The
 * test takes the area out of an image qemu-img made, so the result must
 * equal that image byte for byte, and qemu must open it with the
 * secret.  (The plugin builds the area with issue 8's LUKS code.)
 */

#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"
#include "qcow2-create.h"

int
main (int argc, char **argv)
{
  struct q2_create_opts o;
  FILE *fp;
  long len;
  uint8_t *area;
  int i;

  if (argc < 4) {
    fprintf (stderr, "usage: %s OUT SIZE AREA [OPTION...]\n", argv[0]);
    return 2;
  }
  memset (&o, 0, sizeof o);
  o.size = strtoull (argv[2], NULL, 0);
  o.size_set = true;
  o.crypt_method = QCOW2_CRYPT_LUKS;
  for (i = 4; i < argc; i++) {
    if (strncmp (argv[i], "cluster-size=", 13) == 0)
      o.cluster_size = strtoull (argv[i] + 13, NULL, 0);
    else if (strcmp (argv[i], "compat=0.10") == 0)
      o.version = 2;
    else if (strcmp (argv[i], "preallocation=metadata") == 0)
      o.prealloc = Q2_PREALLOC_METADATA;
    else {
      fprintf (stderr, "unknown option %s\n", argv[i]);
      return 2;
    }
  }
  fp = fopen (argv[3], "rb");
  if (fp == NULL || fseek (fp, 0, SEEK_END) == -1 || (len = ftell (fp)) <= 0) {
    perror (argv[3]);
    return 1;
  }
  rewind (fp);
  area = malloc (len);
  if (area == NULL || fread (area, 1, len, fp) != (size_t) len) {
    perror (argv[3]);
    return 1;
  }
  fclose (fp);
  o.luks_hdr = area;
  o.luks_len = len;
  if (q2_create (argv[1], &o) == -1)
    return 1;
  free (area);
  return 0;
}
