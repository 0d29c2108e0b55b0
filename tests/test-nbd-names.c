/* nbdkit-qcow2: NBD backing names to libnbd URIs.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Every accepted form (URIs, QEMU's legacy nbd: forms, flat and
 * nested json: names) must give the URI written out by hand below, and
 * malformed names must be refused with a message, never crash.  The
 * last part mutates valid json: names at random (seeded, printed) and
 * feeds them to the parser: under the sanitizer build this is a small
 * fuzzer.
 */

#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qcow2.h"
#include "qcow2-nbd.h"

static char msgs[4096];
static unsigned failures;

static void
capture (const char *msg)
{
  snprintf (msgs, sizeof msgs, "%s", msg);
}

static void
ok (const char *name, const char *want)
{
  char *got;

  msgs[0] = '\0';
  if (!q2_nbd_is_name (name)) {
    printf ("FAIL: not recognised as an NBD name: %s\n", name);
    failures++;
    return;
  }
  got = q2_nbd_name_to_uri (name);
  if (got == NULL || strcmp (got, want) != 0) {
    printf ("FAIL: %s\n  want %s\n  got  %s (%s)\n", name, want,
            got ? got : "NULL", msgs);
    failures++;
  }
  else
    printf ("ok: %s -> %s\n", name, got);
  free (got);
}

static void
bad (const char *name, const char *why)
{
  char *got;

  msgs[0] = '\0';
  got = q2_nbd_name_to_uri (name);
  if (got != NULL || strstr (msgs, why) == NULL) {
    printf ("FAIL: %s\n  want an error containing '%s'\n  got %s (%s)\n",
            name, why, got ? got : "success", msgs);
    failures++;
  }
  else
    printf ("ok: refused %s: %s\n", name, msgs);
  free (got);
}

static void
not_nbd (const char *name)
{
  if (q2_nbd_is_name (name)) {
    printf ("FAIL: taken for an NBD name: %s\n", name);
    failures++;
  }
}

int
main (void)
{
  static const char *const seeds[] = {
    "json:{\"file.driver\":\"nbd\",\"file.path\":\"/s\",\"file.export\":\"x\"}",
    "json:{\"driver\":\"raw\",\"file\":{\"driver\":\"nbd\",\"server\":"
    "{\"type\":\"inet\",\"host\":\"h\",\"port\":\"10809\"},\"export\":\"a b\"}}",
    "json:{\"file\":{\"driver\":\"nbd\",\"path\":\"/x\\u00e9\\n\"}}",
  };
  unsigned seed, i, k;

  q2_set_log_hooks (capture, NULL);

  /* URIs pass through unchanged. */
  ok ("nbd://example.com/disk", "nbd://example.com/disk");
  ok ("nbd+unix:///?socket=/tmp/s", "nbd+unix:///?socket=/tmp/s");
  ok ("nbds://h:10810/e", "nbds://h:10810/e");
  ok ("nbd+vsock://2:10809/e", "nbd+vsock://2:10809/e");

  /* Legacy. */
  ok ("nbd:unix:/tmp/s", "nbd+unix:///?socket=/tmp/s");
  ok ("nbd:unix:/tmp/s:exportname=disk 1",
      "nbd+unix:///disk%201?socket=/tmp/s");
  ok ("nbd:unix:/tmp/a:b/s", "nbd+unix:///?socket=/tmp/a%3Ab/s");
  ok ("nbd:localhost:10809", "nbd://localhost:10809/");
  ok ("nbd:localhost:10809:exportname=/a/b", "nbd://localhost:10809/%2Fa%2Fb");
  ok ("nbd:[::1]:10809", "nbd://[::1]:10809/");
  ok ("nbd:host", "nbd://host/");
  bad ("nbd:", "empty host");
  bad ("nbd:unix:", "empty socket path");
  bad ("nbd:h:0", "bad port");
  bad ("nbd:h:99999", "bad port");
  bad ("nbd:h:12x", "bad port");
  bad ("nbd:h:1:2", "bad legacy NBD name");
  bad ("nbd:[::1", "bad legacy NBD name");
  bad ("nbd:h/x:1", "bad host name");
  bad ("nbd:h@evil:1", "bad host name");

  /* json:, flat and nested. */
  ok (seeds[0], "nbd+unix:///x?socket=/s");
  ok (seeds[1], "nbd://h:10809/a%20b");
  ok (seeds[2], "nbd+unix:///?socket=/x%C3%A9%0A");
  ok ("json:{\"file.driver\":\"nbd\",\"file.server.type\":\"unix\","
      "\"file.server.path\":\"/s\"}", "nbd+unix:///?socket=/s");
  ok ("json:{\"file.driver\":\"nbd\",\"file.host\":\"10.0.0.1\","
      "\"file.port\":10810}", "nbd://10.0.0.1:10810/");
  ok ("json: { \"file\" : { \"driver\" : \"nbd\" , \"server\" : { \"path\" :"
      " \"/s\" } } } ", "nbd+unix:///?socket=/s");
  ok ("json:{\"driver\":\"nbd\",\"path\":\"/s\",\"export\":\"e\"}",
      "nbd+unix:///e?socket=/s");
  bad ("json:{\"file.driver\":\"file\",\"file.filename\":\"/etc/passwd\"}",
       "only with the nbd driver");
  bad ("json:{}", "only with the nbd driver");
  bad ("json:{\"file.driver\":\"nbd\",\"file.path\":\"/s\","
       "\"file.tls-creds\":\"t\"}", "not supported");
  bad ("json:{\"file.driver\":\"nbd\",\"file.path\":\"/s\",\"file.host\":\"h\"}",
       "both a socket path and a host");
  bad ("json:{\"file.driver\":\"nbd\"}", "neither a socket path nor a host");
  bad ("json:{\"file.driver\":\"nbd\",\"file.server.type\":\"fd\","
       "\"file.server.str\":\"3\"}", "not supported");
  bad ("json:{\"file.driver\":\"nbd\",\"file.driver\":\"nbd\"}",
       "duplicate key");
  bad ("json:{\"file\":{\"driver\":\"nbd\"},\"file.driver\":\"nbd\"}",
       "duplicate key");
  bad ("json:", "expected an object");
  bad ("json:[1]", "expected an object");
  bad ("json:{\"a\":[1]}", "arrays are not supported");
  bad ("json:{\"a\":1.5}", "only short integers");
  bad ("json:{\"a\":123456789012345678901234}", "only short integers");
  bad ("json:{\"a\":-}", "bad number");
  bad ("json:{\"a\":tru}", "expected a value");
  bad ("json:{\"a\"}", "expected ':'");
  bad ("json:{\"a\":1", "expected ',' or '}'");
  bad ("json:{\"a\":1,}", "expected a string");
  bad ("json:{\"a\":\"x", "unterminated string");
  bad ("json:{\"a\":\"x\\", "unterminated string");
  bad ("json:{\"a\":\"\\q\"}", "bad escape");
  bad ("json:{\"a\":\"\\u12\"}", "bad \\u escape");
  bad ("json:{\"a\":\"\\u0000\"}", "surrogate");
  bad ("json:{\"a\":\"\\ud800\"}", "surrogate");
  bad ("json:{\"a\":\"x\ty\"}", "control character");
  bad ("json:{\"\":1}", "empty or overlong key");
  bad ("json:{\"a\":1} x", "trailing characters");
  bad ("json:{\"a\":{\"b\":{\"c\":{\"d\":{}}}}}", "nested too deeply");
  {
    /* Too many members, and an overlong key. */
    char buf[4096], *p = buf;
    p += sprintf (p, "json:{");
    for (i = 0; i < 40; i++)
      p += sprintf (p, "%s\"k%u\":1", i ? "," : "", i);
    sprintf (p, "}");
    bad (buf, "too many members");
    p = buf;
    p += sprintf (p, "json:{\"");
    for (i = 0; i < 200; i++)
      *p++ = 'k';
    sprintf (p, "\":1}");
    bad (buf, "empty or overlong key");
  }

  not_nbd ("/var/lib/images/base.qcow2");
  not_nbd ("base.qcow2");
  not_nbd ("nbdfile");
  not_nbd ("http://h/x");

  /* Random mutations of valid names: never crash, never leak. */
  seed = getenv ("SEED") ? (unsigned) atoi (getenv ("SEED"))
    : (unsigned) time (NULL);
  printf ("fuzz seed=%u (rerun with SEED=%u)\n", seed, seed);
  srand (seed);
  for (i = 0; i < 20000; i++) {
    char buf[512];
    const char *s = seeds[rand () % 3];
    size_t len = strlen (s);
    unsigned muts = 1 + rand () % 4;
    char *r;

    memcpy (buf, s, len + 1);
    for (k = 0; k < muts; k++) {
      size_t pos = 5 + rand () % (len - 5);
      switch (rand () % 4) {
      case 0: buf[pos] = "{}[]\":,\\u0a \x01\xff"[rand () % 16]; break;
      case 1: buf[pos] = 1 + rand () % 255; break;
      case 2: buf[pos] = '\0'; len = pos; break;   /* truncate */
      case 3:                                      /* duplicate a char */
        if (len + 1 < sizeof buf) {
          memmove (buf + pos + 1, buf + pos, len - pos + 1);
          len++;
        }
        break;
      }
      if (len <= 5)
        break;
    }
    r = q2_nbd_name_to_uri (buf);
    free (r);
  }
  printf ("fuzz: 20000 mutated names parsed without a crash\n");

  if (failures) {
    printf ("%u failures\n", failures);
    return 1;
  }
  return 0;
}
