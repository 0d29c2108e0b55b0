/* nbdkit-qcow2: nbdkit glue shared by the plugin and the filter.
 * SPDX-License-Identifier: BSD-3-Clause
 */

#ifndef QCOW2_GLUE_H
#define QCOW2_GLUE_H

#include <stdint.h>

#include "qcow2.h"

struct nbdkit_extents;

/* .load: the layer's messages go to nbdkit_error and nbdkit_debug. */
extern void q2_glue_load (void);

/* The Q2_ZERO_* flags for a zero request's NBDKIT_FLAG_* flags. */
extern unsigned q2_glue_zero_flags (uint32_t flags);

/* .extents: the block status of [offset, offset+count) (just the first
 * extent with NBDKIT_FLAG_REQ_ONE).  Returns -1 with errno set.
 */
extern int q2_glue_extents (struct q2_image *img, uint32_t count,
                            uint64_t offset, uint32_t flags,
                            struct nbdkit_extents *extents);

#endif /* QCOW2_GLUE_H */
