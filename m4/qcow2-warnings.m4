# SPDX-License-Identifier: BSD-3-Clause
# QCOW2_WARNINGS: strict warnings, errors with --enable-werror.
AC_DEFUN([QCOW2_WARNINGS], [
  AC_ARG_ENABLE([werror],
    [AS_HELP_STRING([--enable-werror], [turn warnings into errors])],
    [], [enable_werror=no])
  WARNINGS_CFLAGS="-Wall -Wextra -Wshadow -Wvla -Wno-unused-parameter -Wformat=2"
  AS_IF([test "x$enable_werror" = "xyes"],
    [WARNINGS_CFLAGS="$WARNINGS_CFLAGS -Werror"])
  AC_SUBST([WARNINGS_CFLAGS])
])
