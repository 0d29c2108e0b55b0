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
  /* snapshot-create=, snapshot-apply=, snapshot-delete=, in order. */
  struct q2_snapshot_op *snapshot_ops;  /* args are ours to free */
  size_t n_snapshot_ops;
};

extern struct q2_params q2_params;

/* Returns 0 if key was handled, -1 on error (reported), and 1 if the
 * key is not one of the shared parameters.
 */
extern int q2_params_config (const char *key, const char *value);
/* Validate and fill in opts once every key has been seen. */
extern int q2_params_complete (void);
extern void q2_params_free (void);
/* Run the snapshot operations asked for, in command-line order, on the
 * image just opened (from .get_ready, before any client).  Fails if
 * nbdkit was started read-only (-r), before touching the file.
 */
extern int q2_params_snapshot_ops (struct q2_image *img);
/* Whether nbdkit's command line has -r (nbdkit 1.32 offers no call);
 * in qcow2-readonly.c.
 */
extern bool q2_params_nbdkit_readonly (void);

/* Help text for the shared parameters (prefix "" or "qcow2-"). */
#define Q2_PARAMS_HELP(p) \
  p "backing=<PATH>|none   Override the backing file named in the image.\n" \
  p "backing-format=raw|qcow2  Format of the backing file (never probed).\n" \
  p "data-file=<PATH>      Override the external data file.\n" \
  p "snapshot=<ID|NAME>    Export an internal snapshot, read-only.\n" \
  p "l2-cache-size=<SIZE>  L2 metadata cache budget (default 32M).\n" \
  p "password=<PASSWORD>|-|+FILE|-FD  Secret of an encrypted image.\n" \
  p "backing-password=...  Secret of encrypted backing files (default: password).\n" \
  p "compress=true         Store every write as compressed clusters.\n" \
  p "snapshot-create=<NAME>  Take an internal snapshot at startup.\n" \
  p "snapshot-apply=<ID|NAME>  Revert to an internal snapshot at startup.\n" \
  p "snapshot-delete=<ID|NAME>  Delete an internal snapshot at startup.\n" \
  p "repair=auto|all|off|check  Refcount repair (default auto: rebuild dirty images)."


#endif /* QCOW2_PARAMS_H */
