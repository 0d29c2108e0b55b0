# SPDX-License-Identifier: BSD-3-Clause
# QCOW2_SANITIZERS: --enable-sanitizers builds with ASan and UBSan.
AC_DEFUN([QCOW2_SANITIZERS], [
  AC_ARG_ENABLE([sanitizers],
    [AS_HELP_STRING([--enable-sanitizers], [build with ASan and UBSan])],
    [], [enable_sanitizers=no])
  SANITIZER_CFLAGS=
  AS_IF([test "x$enable_sanitizers" = "xyes"],
    [SANITIZER_CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"])
  AC_SUBST([SANITIZER_CFLAGS])
  AM_CONDITIONAL([ENABLE_SANITIZERS], [test "x$enable_sanitizers" = "xyes"])
])
