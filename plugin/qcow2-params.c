/* nbdkit-qcow2: parameters shared by the plugin and the filter.
 * SPDX-License-Identifier: BSD-3-Clause
 */

#include <config.h>

#include <stdlib.h>
#include <string.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "qcow2-params.h"

struct q2_params q2_params;

static void
wipe_free (char *secret)
{
  if (secret) {
    explicit_bzero (secret, strlen (secret));
    free (secret);
  }
}

/* backing= and data-file= are relative to the current directory. */
static int
config_path (char **out, const char *value)
{
  free (*out);
  *out = nbdkit_absolute_path (value);
  return *out ? 0 : -1;
}

static int
config_string (char **out, const char *value)
{
  free (*out);
  *out = strdup (value);
  if (*out == NULL) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  return 0;
}

/* nbdkit's forms: the secret itself, "-" to prompt, "+FILE", "-FD". */
static int
config_password (char **out, const char *value)
{
  wipe_free (*out);
  *out = NULL;
  return nbdkit_read_password (value, out);
}

static const char *const snap_keys[] = {
  [Q2_SNAP_CREATE] = "snapshot-create",
  [Q2_SNAP_APPLY] = "snapshot-apply",
  [Q2_SNAP_DELETE] = "snapshot-delete",
};

static int
config_snapshot_op (int kind, const char *value)
{
  struct q2_params *p = &q2_params;
  struct q2_snapshot_op *v;

  if (*value == '\0') {
    nbdkit_error ("%s: the snapshot ID or name must not be empty",
                  snap_keys[kind]);
    return -1;
  }
  v = realloc (p->snapshot_ops, (p->n_snapshot_ops + 1) * sizeof *v);
  if (v == NULL) {
    nbdkit_error ("realloc: %m");
    return -1;
  }
  p->snapshot_ops = v;
  v[p->n_snapshot_ops].kind = kind;
  v[p->n_snapshot_ops].arg = strdup (value);
  if (v[p->n_snapshot_ops].arg == NULL) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  p->n_snapshot_ops++;
  return 0;
}

int
q2_params_config (const char *key, const char *value)
{
  struct q2_params *p = &q2_params;
  int k;

  for (k = Q2_SNAP_CREATE; k <= Q2_SNAP_DELETE; k++)
    if (strcmp (key, snap_keys[k]) == 0)
      return config_snapshot_op (k, value);

  if (strcmp (key, "backing") == 0) {
    if (strcmp (value, "none") == 0)
      return config_string (&p->backing, value);
    return config_path (&p->backing, value);
  }
  if (strcmp (key, "backing-format") == 0) {
    if (strcmp (value, "raw") != 0 && strcmp (value, "qcow2") != 0) {
      nbdkit_error ("backing-format must be raw or qcow2, not '%s'", value);
      return -1;
    }
    p->opts.backing_format = value;  /* nbdkit keeps value alive */
    return 0;
  }
  if (strcmp (key, "data-file") == 0)
    return config_path (&p->data_file, value);
  if (strcmp (key, "snapshot") == 0)
    return config_string (&p->snapshot, value);
  if (strcmp (key, "l2-cache-size") == 0) {
    int64_t r = nbdkit_parse_size (value);
    if (r == -1)
      return -1;
    if (r < 4096) {
      nbdkit_error ("l2-cache-size must be at least 4K");
      return -1;
    }
    p->opts.l2_cache_bytes = r;
    return 0;
  }
  if (strcmp (key, "repair") == 0) {
    if (strcmp (value, "auto") == 0)
      p->opts.repair = Q2_REPAIR_AUTO;
    else if (strcmp (value, "all") == 0)
      p->opts.repair = Q2_REPAIR_ALL;
    else if (strcmp (value, "off") == 0)
      p->opts.repair = Q2_REPAIR_OFF;
    else if (strcmp (value, "check") == 0)
      p->opts.repair = Q2_REPAIR_CHECK;
    else {
      nbdkit_error ("repair must be auto, all, off or check, not '%s'",
                    value);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "password") == 0)
    return config_password (&p->password, value);
  if (strcmp (key, "backing-password") == 0)
    return config_password (&p->backing_password, value);
  if (strcmp (key, "compress") == 0) {
    int r = nbdkit_parse_bool (value);
    if (r == -1)
      return -1;
    p->opts.compress = r;
    return 0;
  }
  return 1;
}

int
q2_params_complete (void)
{
  struct q2_params *p = &q2_params;

  p->opts.backing = p->backing;
  p->opts.data_file = p->data_file;
  p->opts.snapshot = p->snapshot;
  p->opts.password = p->password;
  p->opts.backing_password = p->backing_password;
  if (p->n_snapshot_ops && p->snapshot) {
    nbdkit_error ("snapshot= exports a snapshot read-only; it cannot be "
                  "combined with %s=", snap_keys[p->snapshot_ops[0].kind]);
    return -1;
  }
  return 0;
}

void
q2_params_free (void)
{
  free (q2_params.backing);
  free (q2_params.data_file);
  free (q2_params.snapshot);
  wipe_free (q2_params.password);
  wipe_free (q2_params.backing_password);
  for (size_t i = 0; i < q2_params.n_snapshot_ops; i++)
    free ((char *) q2_params.snapshot_ops[i].arg);
  free (q2_params.snapshot_ops);
  memset (&q2_params, 0, sizeof q2_params);
}

int
q2_params_snapshot_ops (struct q2_image *img)
{
  struct q2_params *p = &q2_params;

  if (p->n_snapshot_ops == 0)
    return 0;
  if (q2_params_nbdkit_readonly ()) {
    nbdkit_error ("%s=%s: nbdkit was started read-only (-r): the image is "
                  "left unchanged", snap_keys[p->snapshot_ops[0].kind],
                  p->snapshot_ops[0].arg);
    return -1;
  }
  return q2_snapshot_run (img, p->snapshot_ops, p->n_snapshot_ops);
}
