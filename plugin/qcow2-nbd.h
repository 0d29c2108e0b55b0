/* nbdkit-qcow2: backing files on NBD servers (libnbd).
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Names: NBD URIs (nbd://, nbds://, nbd+unix://, nbds+unix://,
 * nbd+vsock://, nbds+vsock://), QEMU's legacy nbd:unix:PATH[:exportname=X]
 * and nbd:HOST:PORT[:exportname=X], and json: names whose protocol
 * driver is nbd (flat "file.driver" keys or a nested "file" object).
 *
 * The I/O object is read-only: it never sends a write, trim, zero or
 * flush to the server.
 */

#ifndef QCOW2_NBD_H
#define QCOW2_NBD_H

#include <stdbool.h>
#include <stddef.h>

struct q2_io;

/* Is name an NBD name (one of the forms above, or any json: name,
 * which only the NBD code understands)?  Does not validate it.
 */
extern bool q2_nbd_is_name (const char *name);

/* Convert an NBD name to a URI that nbd_connect_uri accepts.  URIs are
 * returned as they are.  Returns a malloc'd string, or NULL after
 * reporting what is wrong (errno EINVAL or ENOMEM).
 */
extern char *q2_nbd_name_to_uri (const char *name);

/* The format a json: name gives for the image it names (its top-level
 * "driver" beside a "file" layer), in buf; false if it gives none.
 */
extern bool q2_nbd_name_format (const char *name, char *buf, size_t len);

/* Connect to the server named by name (any accepted form) and return
 * a read-only I/O object over its export.  Fails (reported, with
 * libnbd's message) if the server cannot be reached.
 */
extern struct q2_io *q2_io_nbd_open (const char *name);

/* Call after nbdkit's fork into the background (the plugin's and the
 * filter's after_fork): from then on each connection to an NBD server
 * has a thread of its own.  Before, reads are synchronous.
 */
extern void q2_nbd_after_fork (void);

#endif /* QCOW2_NBD_H */
