/* nbdkit-qcow2: preloaded after libasan into nbdkit in sanitizer builds.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * With the ASan runtime preloaded (gcc 12 or clang 14, glibc 2.36),
 * nbdkit hangs at exit after any error message built with %m: the
 * reader count of glibc's internal setlocale lock ends up one too low,
 * and p11-kit's library destructor (gnutls pulls p11-kit into nbdkit)
 * then waits forever in freelocale for that lock.  nbdkit's own
 * file plugin shows it too, so it is not ours.  Making freelocale do
 * nothing (the locale leaks at exit) lets such processes end, so that
 * the tests see nbdkit's real exit status instead of a timeout.
 */

#include <locale.h>

void
freelocale (locale_t loc)
{
  (void) loc;
}
