/* nbdkit-qcow2: the layer's error and debug hooks.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * The layer reports through hooks so that the plugin can route messages
 * to nbdkit_error/nbdkit_debug while tests and fuzzers use stderr.
 */

#include <config.h>

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>

#include "qcow2-internal.h"

static void
stderr_hook (const char *msg)
{
  fprintf (stderr, "qcow2: %s\n", msg);
}

static q2_log_fn error_hook = stderr_hook;
static q2_log_fn debug_hook = NULL;

void
q2_set_log_hooks (q2_log_fn error, q2_log_fn debug)
{
  error_hook = error;
  debug_hook = debug;
}

static void
vlog (q2_log_fn hook, const char *fmt, va_list ap)
{
  char msg[1024];
  int saved_errno = errno;      /* so that %m and callers' errno survive */

  if (!hook)
    return;
  vsnprintf (msg, sizeof msg, fmt, ap);
  hook (msg);
  errno = saved_errno;
}

void
q2_error (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vlog (error_hook, fmt, ap);
  va_end (ap);
}

void
q2_debug (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vlog (debug_hook, fmt, ap);
  va_end (ap);
}
