/* nbdkit-qcow2: nbdkit glue shared by the plugin and the filter.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * What the two front ends do alike with the layer; each keeps its own
 * callbacks (their signatures differ) and calls these.
 */

#include <config.h>

#include <stdint.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "qcow2.h"
#include "qcow2-glue.h"

static void
log_error (const char *msg)
{
  nbdkit_error ("%s", msg);
}

static void
log_debug (const char *msg)
{
  nbdkit_debug ("%s", msg);
}

void
q2_glue_load (void)
{
  q2_set_log_hooks (log_error, log_debug);
}

unsigned
q2_glue_zero_flags (uint32_t flags)
{
  unsigned f = 0;

  if (flags & NBDKIT_FLAG_MAY_TRIM)
    f |= Q2_ZERO_MAY_TRIM;
  if (flags & NBDKIT_FLAG_FAST_ZERO)
    f |= Q2_ZERO_FAST;
  return f;
}

int
q2_glue_extents (struct q2_image *img, uint32_t count, uint64_t offset,
                 uint32_t flags, struct nbdkit_extents *extents)
{
  while (count > 0) {
    uint64_t len;
    unsigned st;

    if (q2_block_status (img, offset, count, &len, &st) == -1 ||
        nbdkit_add_extent (extents, offset, len, st) == -1)
      return -1;
    if (flags & NBDKIT_FLAG_REQ_ONE)
      break;
    offset += len;
    count -= len;
  }
  return 0;
}
