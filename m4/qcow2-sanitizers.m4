# SPDX-License-Identifier: BSD-3-Clause
# QCOW2_SANITIZERS: --enable-sanitizers builds with ASan and UBSan.
# LIBASAN is the ASan runtime that `make check` preloads into nbdkit
# (which is not built with ASan itself) in such a build.
AC_DEFUN([QCOW2_SANITIZERS], [
  AC_ARG_ENABLE([sanitizers],
    [AS_HELP_STRING([--enable-sanitizers], [build with ASan and UBSan])],
    [], [enable_sanitizers=no])
  SANITIZER_CFLAGS=
  LIBASAN=
  AS_IF([test "x$enable_sanitizers" = "xyes"], [
    SANITIZER_CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
    AC_MSG_CHECKING([for the ASan runtime to preload into nbdkit])
    LIBASAN=`$CC -print-file-name=libasan.so 2>/dev/null`
    AS_CASE([$LIBASAN],
      [/*], [AS_IF([test -f "$LIBASAN"], [], [LIBASAN=])],
      [LIBASAN=])
    AS_IF([test -n "$LIBASAN"], [AC_MSG_RESULT([$LIBASAN])],
      [AC_MSG_RESULT([not found])
       AC_MSG_WARN([$CC does not name libasan.so; tests that run nbdkit will fail (use CC=gcc)])])
  ])
  AC_SUBST([SANITIZER_CFLAGS])
  AC_SUBST([LIBASAN])
  AM_CONDITIONAL([ENABLE_SANITIZERS], [test "x$enable_sanitizers" = "xyes"])
])
