/* nbdkit-qcow2: parameters shared by the plugin and the filter.
 * SPDX-License-Identifier: BSD-3-Clause
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

/* nbdkit 1.32 tells .get_ready nothing about -r, so read our own
 * command line (/proc/self/cmdline) with nbdkit's option syntax: the
 * options it lists with --short-options and --long-options, those that
 * take an argument marked, parsed by getopt_long as nbdkit does.
 */
static const char nbdkit_short_opts[] = "46D:e:fg:i:nop:P:rst:u:U:vV";
static const struct option nbdkit_long_opts[] = {
  { "ipv4-only", no_argument, NULL, '4' },
  { "ipv6-only", no_argument, NULL, '6' },
  { "debug", required_argument, NULL, 'D' },
  { "dump-config", no_argument, NULL, 0 },
  { "dump-plugin", no_argument, NULL, 0 },
  { "exit-with-parent", no_argument, NULL, 0 },
  { "export", required_argument, NULL, 'e' },
  { "export-name", required_argument, NULL, 'e' },
  { "exportname", required_argument, NULL, 'e' },
  { "filter", required_argument, NULL, 0 },
  { "foreground", no_argument, NULL, 'f' },
  { "no-fork", no_argument, NULL, 'f' },
  { "group", required_argument, NULL, 'g' },
  { "help", no_argument, NULL, 0 },
  { "ip-addr", required_argument, NULL, 'i' },
  { "ipaddr", required_argument, NULL, 'i' },
  { "log", required_argument, NULL, 0 },
  { "mask-handshake", required_argument, NULL, 0 },
  { "new-style", no_argument, NULL, 'n' },
  { "newstyle", no_argument, NULL, 'n' },
  { "no-sr", no_argument, NULL, 0 },
  { "old-style", no_argument, NULL, 'o' },
  { "oldstyle", no_argument, NULL, 'o' },
  { "pid-file", required_argument, NULL, 'P' },
  { "pidfile", required_argument, NULL, 'P' },
  { "port", required_argument, NULL, 'p' },
  { "read-only", no_argument, NULL, 'r' },
  { "readonly", no_argument, NULL, 'r' },
  { "run", required_argument, NULL, 0 },
  { "selinux-label", required_argument, NULL, 0 },
  { "single", no_argument, NULL, 's' },
  { "stdin", no_argument, NULL, 's' },
  { "swap", no_argument, NULL, 0 },
  { "threads", required_argument, NULL, 't' },
  { "tls", required_argument, NULL, 0 },
  { "tls-certificates", required_argument, NULL, 0 },
  { "tls-psk", required_argument, NULL, 0 },
  { "tls-verify-peer", no_argument, NULL, 0 },
  { "unix", required_argument, NULL, 'U' },
  { "user", required_argument, NULL, 'u' },
  { "verbose", no_argument, NULL, 'v' },
  { "version", no_argument, NULL, 'V' },
  { "vsock", no_argument, NULL, 0 },
  { NULL },
};

bool
q2_params_nbdkit_readonly (void)
{
  char *buf = NULL, **argv = NULL;
  size_t len = 0, cap = 0, argc = 0, i;
  bool ro = false;
  int fd, c, save_optind = optind, save_opterr = opterr;
  char *save_optarg = optarg;
  ssize_t n;

  fd = open ("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
  if (fd == -1) {
    nbdkit_debug ("qcow2: cannot read /proc/self/cmdline: %m");
    return false;
  }
  for (;;) {
    if (len + 4096 + 1 > cap) {
      char *b = realloc (buf, cap = len + 65536);
      if (b == NULL)
        goto out;
      buf = b;
    }
    n = read (fd, buf + len, cap - len - 1);
    if (n <= 0)
      break;
    len += n;
  }
  if (buf == NULL || len == 0)
    goto out;
  buf[len] = '\0';
  for (i = 0; i < len; i++)
    if (buf[i] == '\0')
      argc++;
  argv = calloc (argc + 2, sizeof *argv);
  if (argv == NULL)
    goto out;
  argc = 0;
  for (i = 0; i < len; i += strlen (buf + i) + 1)
    argv[argc++] = buf + i;
  /* nbdkit lets getopt permute: -r may follow the plugin name. */
  optind = 0;
  opterr = 0;
  while ((c = getopt_long ((int) argc, argv, nbdkit_short_opts,
                           nbdkit_long_opts, NULL)) != -1)
    if (c == 'r')
      ro = true;
  optind = save_optind;
  opterr = save_opterr;
  optarg = save_optarg;
 out:
  close (fd);
  free (argv);
  free (buf);
  return ro;
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
