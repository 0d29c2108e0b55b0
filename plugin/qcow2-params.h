/* nbdkit-qcow2: parameters shared by the plugin and the filter.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * The plugin passes its keys as they are; the filter strips its
 * "qcow2-" prefix first.  A new parameter is added here once and both
 * front ends get it.
 */

#ifndef QCOW2_PARAMS_H
#define QCOW2_PARAMS_H

#include "qcow2.h"

struct q2_params {
  char *backing;
  char *data_file;
  char *snapshot;
  char *password;               /* wiped before it is freed */
  char *backing_password;
  struct q2_open_opts opts;     /* points into the fields above */
};

extern struct q2_params q2_params;

/* Returns 0 if key was handled, -1 on error (reported), and 1 if the
 * key is not one of the shared parameters.
 */
extern int q2_params_config (const char *key, const char *value);
/* Validate and fill in opts once every key has been seen. */
extern int q2_params_complete (void);
extern void q2_params_free (void);

/* Help text for the shared parameters (prefix "" or "qcow2-"). */
#define Q2_PARAMS_HELP(p) \
  p "backing=<PATH>|none   Override the backing file named in the image.\n" \
  p "backing=<NBD-URI>     Backing file on an NBD server (nbd://, nbd+unix://...).\n" \
  p "allow-remote-backing=true  Follow NBD backing names found in images.\n" \
  p "backing-format=raw|qcow2  Format of the backing file (never probed).\n" \
  p "data-file=<PATH>      Override the external data file.\n" \
  p "snapshot=<ID|NAME>    Export an internal snapshot, read-only.\n" \
  p "l2-cache-size=<SIZE>  L2 metadata cache budget (default 32M).\n" \
  p "password=<PASSWORD>|-|+FILE|-FD  Secret of an encrypted image.\n" \
  p "backing-password=...  Secret of encrypted backing files (default: password)."


#endif /* QCOW2_PARAMS_H */
