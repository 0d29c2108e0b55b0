/* nbdkit-qcow2: was nbdkit started read-only (-r)?
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Used by the snapshot operations, which run from .get_ready and must
 * not write to a file that is to be served read-only.
 */

#include <config.h>

#include <fcntl.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "qcow2-params.h"

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
