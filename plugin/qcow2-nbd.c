/* nbdkit-qcow2: backing files on NBD servers (libnbd).
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Two parts:
 *
 * 1. Names.  Every accepted form is turned into a libnbd URI.  json:
 *    names are read by a small strict parser (objects, strings,
 *    integers, true/false/null; no arrays), bounded in length, depth
 *    and number of members.  Nested objects are flattened to dotted
 *    keys, so that {"file":{"driver":"nbd"}} and {"file.driver":"nbd"}
 *    mean the same.  Unknown keys are refused rather than ignored (a
 *    tls-creds we cannot honour must not silently become plain text).
 *
 * 2. A read-only struct q2_io over libnbd.  nbdkit calls us from many
 *    threads at once.  Each backing has one connection for reads,
 *    owned by a thread of its own: callers queue requests and sleep;
 *    the thread sends them, so that many are in flight at once, reads
 *    the replies and wakes each caller as its reply arrives.  Nobody
 *    else touches the handle, so nobody waits for its lock.  On a 2-core
 *    machine every wake-up costs, and this arrangement has the fewest:
 *    the server finds requests queued on one socket instead of being
 *    woken for each (see struct conn for the figures).
 *
 *    The first connection, made at open time so that a bad address
 *    fails startup with libnbd's message, serves reads until nbdkit's
 *    fork into the background (threads do not survive it) and block
 *    status after it.  A server without multi-conn may take only one
 *    client (qemu-nbd without --shared), so then the thread takes that
 *    connection over for everything; so it does when a second client
 *    is refused.
 *
 *    If the connection dies (the server went away), its requests fail
 *    with EIO and a logged message, and the next request makes a new
 *    connection: a restarted server heals the export.  A request that
 *    found its connection dead is tried once more on a new one.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <libnbd.h>

#include "qcow2-internal.h"
#include "qcow2-nbd.h"

/* ---------------------------------------------------------------- */
/* Names */

#define JSON_MAX_LEN 65536
#define JSON_MAX_DEPTH 4
#define JSON_MAX_PAIRS 32
#define JSON_MAX_KEY 128

struct jpair {
  char key[JSON_MAX_KEY];
  char *val;
};

struct jparser {
  const char *p;
  const char *start;
  const char *name;             /* the whole name, for messages */
  struct jpair pairs[JSON_MAX_PAIRS];
  unsigned n;
};

static void
jp_free (struct jparser *j)
{
  unsigned i;

  for (i = 0; i < j->n; i++)
    free (j->pairs[i].val);
  j->n = 0;
}

static int
jp_err (struct jparser *j, const char *what)
{
  q2_error ("%s: malformed json: backing name at character %zu: %s",
            j->name, (size_t) (j->p - j->start), what);
  errno = EINVAL;
  return -1;
}

static void
jp_ws (struct jparser *j)
{
  while (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')
    j->p++;
}

static int
hexval (char c)
{
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* A JSON string at j->p (which is at the opening quote).  Returns a
 * malloc'd UTF-8 string.  \u0000 and surrogates are refused.
 */
static char *
jp_string (struct jparser *j)
{
  const char *q;
  size_t cap;
  char *out, *o;

  if (*j->p != '"') {
    jp_err (j, "expected a string");
    return NULL;
  }
  j->p++;
  /* The decoded string is never longer than the encoded one. */
  for (q = j->p; *q && *q != '"'; q++)
    if (*q == '\\' && q[1])
      q++;
  if (*q != '"') {
    jp_err (j, "unterminated string");
    return NULL;
  }
  cap = (size_t) (q - j->p) + 1;
  out = o = malloc (cap);
  if (out == NULL) {
    q2_error ("malloc: %m");
    return NULL;
  }
  while (*j->p != '"') {
    unsigned char c = *j->p;

    if (c < 0x20) {
      jp_err (j, "control character in a string");
      goto bad;
    }
    if (c != '\\') {
      *o++ = c;
      j->p++;
      continue;
    }
    j->p++;
    switch (*j->p) {
    case '"': *o++ = '"'; break;
    case '\\': *o++ = '\\'; break;
    case '/': *o++ = '/'; break;
    case 'b': *o++ = '\b'; break;
    case 'f': *o++ = '\f'; break;
    case 'n': *o++ = '\n'; break;
    case 'r': *o++ = '\r'; break;
    case 't': *o++ = '\t'; break;
    case 'u': {
      unsigned v = 0;
      int k;

      for (k = 1; k <= 4; k++) {
        int h = hexval (j->p[k]);
        if (h < 0) {
          jp_err (j, "bad \\u escape");
          goto bad;
        }
        v = v * 16 + h;
      }
      if (v == 0 || (v >= 0xd800 && v <= 0xdfff)) {
        jp_err (j, "\\u0000 or a surrogate in a string");
        goto bad;
      }
      /* At most 3 bytes from 6 characters of input: fits in cap. */
      if (v < 0x80)
        *o++ = v;
      else if (v < 0x800) {
        *o++ = 0xc0 | (v >> 6);
        *o++ = 0x80 | (v & 0x3f);
      }
      else {
        *o++ = 0xe0 | (v >> 12);
        *o++ = 0x80 | ((v >> 6) & 0x3f);
        *o++ = 0x80 | (v & 0x3f);
      }
      j->p += 4;
      break;
    }
    default:
      jp_err (j, "bad escape in a string");
      goto bad;
    }
    j->p++;
  }
  j->p++;                       /* closing quote */
  *o = '\0';
  return out;
 bad:
  free (out);
  return NULL;
}

static int
jp_add (struct jparser *j, const char *key, char *val)
{
  unsigned i;

  for (i = 0; i < j->n; i++) {
    if (strcmp (j->pairs[i].key, key) == 0) {
      free (val);
      return jp_err (j, "duplicate key");
    }
  }
  if (j->n >= JSON_MAX_PAIRS) {
    free (val);
    return jp_err (j, "too many members");
  }
  strcpy (j->pairs[j->n].key, key);
  j->pairs[j->n].val = val;
  j->n++;
  return 0;
}

static int jp_value (struct jparser *j, const char *key, unsigned depth);

static int
jp_object (struct jparser *j, const char *prefix, unsigned depth)
{
  if (depth >= JSON_MAX_DEPTH)
    return jp_err (j, "objects nested too deeply");
  j->p++;                       /* '{' */
  jp_ws (j);
  if (*j->p == '}') {
    j->p++;
    return 0;
  }
  for (;;) {
    char key[JSON_MAX_KEY];
    char *k;
    size_t pl = strlen (prefix), kl;

    jp_ws (j);
    k = jp_string (j);
    if (k == NULL)
      return -1;
    kl = strlen (k);
    if (kl == 0 || pl + 1 + kl >= JSON_MAX_KEY) {
      free (k);
      return jp_err (j, "empty or overlong key");
    }
    if (pl)
      snprintf (key, sizeof key, "%s.%s", prefix, k);
    else
      snprintf (key, sizeof key, "%s", k);
    free (k);
    jp_ws (j);
    if (*j->p != ':')
      return jp_err (j, "expected ':'");
    j->p++;
    if (jp_value (j, key, depth + 1) == -1)
      return -1;
    jp_ws (j);
    if (*j->p == ',') {
      j->p++;
      continue;
    }
    if (*j->p == '}') {
      j->p++;
      return 0;
    }
    return jp_err (j, "expected ',' or '}'");
  }
}

static int
jp_value (struct jparser *j, const char *key, unsigned depth)
{
  const char *s;
  char *v;

  jp_ws (j);
  switch (*j->p) {
  case '{':
    return jp_object (j, key, depth);
  case '"':
    v = jp_string (j);
    if (v == NULL)
      return -1;
    return jp_add (j, key, v);
  case '[':
    return jp_err (j, "arrays are not supported");
  }
  s = j->p;
  if (*j->p == '-' || (*j->p >= '0' && *j->p <= '9')) {
    if (*j->p == '-')
      j->p++;
    if (!(*j->p >= '0' && *j->p <= '9'))
      return jp_err (j, "bad number");
    while (*j->p >= '0' && *j->p <= '9' && j->p - s < 20)
      j->p++;
    if (*j->p == '.' || *j->p == 'e' || *j->p == 'E' ||
        (*j->p >= '0' && *j->p <= '9'))
      return jp_err (j, "only short integers are supported");
  }
  else if (strncmp (j->p, "true", 4) == 0)
    j->p += 4;
  else if (strncmp (j->p, "false", 5) == 0)
    j->p += 5;
  else if (strncmp (j->p, "null", 4) == 0)
    j->p += 4;
  else
    return jp_err (j, "expected a value");
  v = strndup (s, j->p - s);
  if (v == NULL) {
    q2_error ("malloc: %m");
    return -1;
  }
  return jp_add (j, key, v);
}

/* Parse text (after "json:") into j; on error j is empty. */
static int
jp_parse (struct jparser *j, const char *name, const char *text)
{
  j->name = name;
  j->start = j->p = text;
  j->n = 0;
  if (strlen (text) > JSON_MAX_LEN)
    return jp_err (j, "too long");
  jp_ws (j);
  if (*j->p != '{')
    return jp_err (j, "expected an object");
  if (jp_object (j, "", 0) == -1)
    goto bad;
  jp_ws (j);
  if (*j->p != '\0') {
    jp_err (j, "trailing characters after the object");
    goto bad;
  }
  return 0;
 bad:
  jp_free (j);
  return -1;
}

static const char *
jp_get (struct jparser *j, const char *prefix, const char *key)
{
  char k[JSON_MAX_KEY * 2];
  unsigned i;

  snprintf (k, sizeof k, "%s%s", prefix, key);
  for (i = 0; i < j->n; i++)
    if (strcmp (j->pairs[i].key, k) == 0)
      return j->pairs[i].val;
  return NULL;
}

/* ---- building URIs ---- */

struct sbuf {
  char *s;
  size_t len, cap;
  bool failed;
};

static void
sb_addn (struct sbuf *b, const char *s, size_t n)
{
  if (b->failed)
    return;
  if (b->len + n + 1 > b->cap) {
    size_t cap = (b->len + n + 1) * 2;
    char *p = realloc (b->s, cap);
    if (p == NULL) {
      b->failed = true;
      return;
    }
    b->s = p;
    b->cap = cap;
  }
  memcpy (b->s + b->len, s, n);
  b->len += n;
  b->s[b->len] = '\0';
}

static void
sb_add (struct sbuf *b, const char *s)
{
  sb_addn (b, s, strlen (s));
}

/* Percent-encode everything but RFC 3986 unreserved characters (and
 * '/' when keep_slash).
 */
static void
sb_add_enc (struct sbuf *b, const char *s, bool keep_slash)
{
  static const char hex[] = "0123456789ABCDEF";

  for (; *s; s++) {
    unsigned char c = *s;
    if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
        (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_' ||
        c == '~' || (keep_slash && c == '/'))
      sb_addn (b, (const char *) &c, 1);
    else {
      char e[3] = { '%', hex[c >> 4], hex[c & 15] };
      sb_addn (b, e, 3);
    }
  }
}

static char *
sb_finish (struct sbuf *b, const char *name)
{
  if (b->failed || b->s == NULL) {
    free (b->s);
    q2_error ("%s: malloc: %m", name);
    errno = ENOMEM;
    return NULL;
  }
  return b->s;
}

static bool
valid_port (const char *port)
{
  char *end;
  long v;

  if (port == NULL || *port == '\0' || *port == '-' || *port == '+')
    return false;
  errno = 0;
  v = strtol (port, &end, 10);
  return errno == 0 && *end == '\0' && v >= 1 && v <= 65535;
}

static char *
make_unix_uri (const char *name, const char *path, const char *export)
{
  struct sbuf b = { 0 };

  if (path == NULL || *path == '\0') {
    q2_error ("%s: NBD name has an empty socket path", name);
    errno = EINVAL;
    return NULL;
  }
  sb_add (&b, "nbd+unix:///");
  if (export)
    sb_add_enc (&b, export, false);
  sb_add (&b, "?socket=");
  sb_add_enc (&b, path, true);
  return sb_finish (&b, name);
}

static char *
make_tcp_uri (const char *name, const char *host, const char *port,
              const char *export)
{
  struct sbuf b = { 0 };
  const char *h;

  if (host == NULL || *host == '\0') {
    q2_error ("%s: NBD name has an empty host", name);
    errno = EINVAL;
    return NULL;
  }
  if (port && !valid_port (port)) {
    q2_error ("%s: NBD name has a bad port '%s'", name, port);
    errno = EINVAL;
    return NULL;
  }
  for (h = host; *h; h++) {
    if (!((*h >= 'A' && *h <= 'Z') || (*h >= 'a' && *h <= 'z') ||
          (*h >= '0' && *h <= '9') || *h == '-' || *h == '.' ||
          *h == ':' || *h == '_')) {
      q2_error ("%s: NBD name has a bad host name '%s'", name, host);
      errno = EINVAL;
      return NULL;
    }
  }
  sb_add (&b, "nbd://");
  if (strchr (host, ':')) {     /* IPv6 literal */
    sb_add (&b, "[");
    sb_add (&b, host);
    sb_add (&b, "]");
  }
  else
    sb_add (&b, host);
  if (port) {
    sb_add (&b, ":");
    sb_add (&b, port);
  }
  sb_add (&b, "/");
  if (export)
    sb_add_enc (&b, export, false);
  return sb_finish (&b, name);
}

/* nbd:unix:PATH[:exportname=X] and nbd:HOST:PORT[:exportname=X]. */
static char *
legacy_to_uri (const char *name)
{
  const char *rest = name + 4;          /* after "nbd:" */
  const char *ex = strstr (rest, ":exportname=");
  char *main_part, *export = NULL, *r = NULL;

  if (ex) {
    main_part = strndup (rest, ex - rest);
    export = strdup (ex + strlen (":exportname="));
  }
  else
    main_part = strdup (rest);
  if (main_part == NULL || (ex && export == NULL)) {
    q2_error ("%s: malloc: %m", name);
    errno = ENOMEM;
    goto out;
  }
  if (strncmp (main_part, "unix:", 5) == 0)
    r = make_unix_uri (name, main_part + 5, export);
  else {
    char *host = main_part, *port;

    if (host[0] == '[') {               /* [IPv6]:PORT */
      char *close = strchr (host, ']');
      if (close == NULL || (close[1] != ':' && close[1] != '\0')) {
        q2_error ("%s: bad legacy NBD name (expected nbd:[HOST]:PORT)", name);
        errno = EINVAL;
        goto out;
      }
      *close = '\0';
      port = close[1] ? close + 2 : NULL;
      host++;
    }
    else {
      port = strchr (host, ':');
      if (port)
        *port++ = '\0';
      if (port && strchr (port, ':')) {
        q2_error ("%s: bad legacy NBD name (expected nbd:unix:PATH"
                  "[:exportname=NAME] or nbd:HOST:PORT[:exportname=NAME])",
                  name);
        errno = EINVAL;
        goto out;
      }
    }
    r = make_tcp_uri (name, host, port, export);
  }
 out:
  free (main_part);
  free (export);
  return r;
}

static const char *const json_keys[] = {
  "driver", "export", "path", "host", "port",
  "server.type", "server.path", "server.host", "server.port", NULL
};

static char *
json_to_uri (const char *name)
{
  struct jparser j;
  const char *prefix = "file.";
  const char *drv, *type, *path, *host, *port, *export;
  char *r = NULL;
  unsigned i, k;

  if (jp_parse (&j, name, name + 5) == -1)
    return NULL;
  drv = jp_get (&j, "", "file.driver");
  if (drv == NULL) {
    prefix = "";
    drv = jp_get (&j, "", "driver");
  }
  if (drv == NULL || strcmp (drv, "nbd") != 0) {
    q2_error ("%s: json: backing names are supported only with the nbd "
              "driver (\"file.driver\": \"nbd\")", name);
    errno = ENOTSUP;
    goto out;
  }
  /* Refuse what we would otherwise ignore. */
  for (i = 0; i < j.n; i++) {
    const char *key = j.pairs[i].key;
    bool ok = false;

    if (*prefix && strcmp (key, "driver") == 0) /* format: "raw" etc. */
      ok = true;
    if (strncmp (key, prefix, strlen (prefix)) == 0)
      for (k = 0; json_keys[k]; k++)
        if (strcmp (key + strlen (prefix), json_keys[k]) == 0)
          ok = true;
    if (!ok) {
      q2_error ("%s: json: backing name has key '%s', which is not "
                "supported", name, key);
      errno = ENOTSUP;
      goto out;
    }
  }
  export = jp_get (&j, prefix, "export");
  type = jp_get (&j, prefix, "server.type");
  path = jp_get (&j, prefix, "server.path");
  host = jp_get (&j, prefix, "server.host");
  port = jp_get (&j, prefix, "server.port");
  if (type == NULL && path == NULL && host == NULL && port == NULL) {
    path = jp_get (&j, prefix, "path");
    host = jp_get (&j, prefix, "host");
    port = jp_get (&j, prefix, "port");
  }
  else if (jp_get (&j, prefix, "path") || jp_get (&j, prefix, "host") ||
           jp_get (&j, prefix, "port")) {
    q2_error ("%s: json: backing name mixes server.* with path/host/port",
              name);
    errno = EINVAL;
    goto out;
  }
  if (type && strcmp (type, "unix") != 0 && strcmp (type, "inet") != 0) {
    q2_error ("%s: json: backing name has server type '%s'; only unix and "
              "inet are supported", name, type);
    errno = ENOTSUP;
    goto out;
  }
  if ((path && (host || port)) || (type && strcmp (type, "unix") == 0 &&
                                   (host || port)) ||
      (type && strcmp (type, "inet") == 0 && path)) {
    q2_error ("%s: json: backing name gives both a socket path and a host",
              name);
    errno = EINVAL;
    goto out;
  }
  if (path)
    r = make_unix_uri (name, path, export);
  else if (host)
    r = make_tcp_uri (name, host, port, export);
  else {
    q2_error ("%s: json: backing name gives neither a socket path nor a "
              "host", name);
    errno = EINVAL;
  }
 out:
  jp_free (&j);
  return r;
}

static const char *const uri_schemes[] = {
  "nbd://", "nbds://", "nbd+unix://", "nbds+unix://",
  "nbd+vsock://", "nbds+vsock://", NULL
};

static bool
is_uri (const char *name)
{
  unsigned i;

  for (i = 0; uri_schemes[i]; i++)
    if (strncmp (name, uri_schemes[i], strlen (uri_schemes[i])) == 0)
      return true;
  return false;
}

bool
q2_nbd_is_name (const char *name)
{
  return name && (is_uri (name) || strncmp (name, "nbd:", 4) == 0 ||
                  strncmp (name, "json:", 5) == 0);
}

char *
q2_nbd_name_to_uri (const char *name)
{
  char *r;

  if (is_uri (name)) {
    r = strdup (name);
    if (r == NULL)
      q2_error ("%s: strdup: %m", name);
    return r;
  }
  if (strncmp (name, "json:", 5) == 0)
    return json_to_uri (name);
  if (strncmp (name, "nbd:", 4) == 0)
    return legacy_to_uri (name);
  q2_error ("%s: not an NBD name", name);
  errno = EINVAL;
  return NULL;
}

bool
q2_nbd_name_format (const char *name, char *buf, size_t len)
{
  struct jparser j;
  const char *drv;

  if (strncmp (name, "json:", 5) != 0)
    return false;
  if (jp_parse (&j, name, name + 5) == -1)
    return false;               /* json_to_uri reports it */
  /* With a "file" layer, the top-level driver is the format. */
  drv = jp_get (&j, "", "file.driver") ? jp_get (&j, "", "driver") : NULL;
  if (drv)
    snprintf (buf, len, "%s", drv);
  jp_free (&j);
  return drv != NULL;
}

/* ---------------------------------------------------------------- */
/* I/O over libnbd */

/* Largest piece of one read; the pieces of a larger read go out
 * together, NBD_MAX_PIECES at a time.
 */
#define NBD_MAX_REQUEST (4 * 1024 * 1024)
#define NBD_MAX_PIECES 16
/* Commands in flight on the connection; more wait in the queue. */
#define NBD_MAX_INFLIGHT 64
#define NBD_CONNECT_TIMEOUT_MS 5000     /* reconnections */
#define NBD_FIRST_CONNECT_TIMEOUT_MS 60000

/* nbdkit forks into the background after get_ready, and threads do not
 * survive a fork (worse, one left in the parent would go on reading
 * our socket until the parent exits).  Until q2_nbd_after_fork, reads
 * are synchronous in the caller's thread.
 */
static bool threads_allowed;

void
q2_nbd_after_fork (void)
{
  __atomic_store_n (&threads_allowed, true, __ATOMIC_RELEASE);
}

/* One caller's request: some ops, and a semaphore it sleeps on. */
struct waiter {
  sem_t sem;
  unsigned pending;             /* ops not finished (connection thread) */
  int err;                      /* the first error */
  bool dead;                    /* an op failed as the connection died */
  char msg[256];                /* what the first error was */
};

enum op_kind { OP_READ, OP_STATUS };

/* One NBD command.  It lives on its caller's stack, which waits for
 * it; from the queue on, only the connection thread touches it.
 */
struct op {
  enum op_kind kind;
  void *buf;
  size_t len;                   /* read length, or status range */
  uint64_t off;
  struct waiter *w;
  struct op *next;              /* in the queue */
  struct conn *c;
  int64_t cookie;
  int err;                      /* from libnbd's completion */
  bool done;
  struct op *done_next;
  struct op *iprev, *inext;     /* in conn->inflight_list */
  /* OP_STATUS: the first extent */
  bool got;
  uint64_t st_len;
  uint32_t st_flags;
};

struct nbd_io;

/* The connection, and the thread that owns it.  Callers only queue
 * ops and sleep; the thread sends them, reads the replies and wakes
 * the callers.  With several requests in flight on one socket the
 * server answers them in a row (nbdkit needs no wake-up per request),
 * and no caller ever waits for libnbd's handle lock: bench workload j
 * measured this at 1.3x qemu-nbd, against 1.1x for a pool of
 * connections with one synchronous request each, and 1.2x for callers
 * that send their own requests to a reading thread.
 */
struct link {
  struct nbd_handle *h;         /* NULL: none (the reconnection failed) */
  bool plain;                   /* simple replies: reads only */
  bool down_logged;
};

struct conn {
  struct nbd_io *n;
  struct link l;                /* the thread's */
  int wakefd;                   /* eventfd: wake the thread */
  pthread_mutex_t lock;         /* the fields below, up to the thread's */
  struct op *queue, **tail;
  bool sleeping;                /* the thread is in poll(), or going */
  bool stop;
  bool started;
  pthread_t thread;
  /* The thread's own */
  unsigned inflight;
  struct op *inflight_list;     /* sent, not yet finished */
  struct op *done;              /* completed, not yet finished */
  bool ever;                    /* l has been connected */
  bool shut;                    /* the server said it is going: drop l */
  /* A reconnection failed for this batch: fail the rest of it at once
   * rather than wait for the same server once per request.
   */
  bool batch_failed;
  char batch_msg[200];
};

struct nbd_io {
  struct q2_io io;
  char *uri;
  int64_t size;
  bool can_status;              /* base:allocation negotiated */
  /* The server advertises multi-conn (so it takes more than one
   * client): the thread reads on a connection of its own with simple
   * replies (fewer system calls on both sides; bench workload j
   * measured 10-15% more IOPS than structured ones), and block status
   * stays synchronous on the first connection.  Without multi-conn,
   * the first connection is handed to the thread for everything.
   */
  bool multi;
  /* The first connection: synchronous calls, one at a time. */
  pthread_mutex_t sync_lock;
  struct link sync;
  struct conn conn;
};

static int
connect_timed (struct nbd_handle *h, const char *uri, int timeout_ms,
               bool quiet)
{
  struct timespec t0, t;
  long ms;

  clock_gettime (CLOCK_MONOTONIC, &t0);
  if (nbd_aio_connect_uri (h, uri) == -1)
    return -1;
  while (nbd_aio_is_connecting (h)) {
    clock_gettime (CLOCK_MONOTONIC, &t);
    ms = (t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000;
    if (ms >= timeout_ms) {
      (quiet ? q2_debug : q2_error)
        ("%s: the NBD server did not complete the handshake within %d ms",
         uri, timeout_ms);
      errno = ETIMEDOUT;
      return -2;
    }
    if (nbd_poll (h, timeout_ms - ms) == -1)
      return -1;
  }
  if (!nbd_aio_is_ready (h))
    return -1;
  return 0;
}

/* A new handle, connected.  The first one learns the export's size and
 * features; later ones must find the same size.  Failures are reported
 * with libnbd's message (as debug messages when quiet) and put in msg.
 */
static struct nbd_handle *
handle_new (struct nbd_io *n, bool first, bool plain, bool quiet, char *msg,
             size_t msglen)
{
  struct nbd_handle *h = nbd_create ();
  int64_t sz;
  int r;

  if (h == NULL)
    goto nbd_err;
  if (plain) {
    if (nbd_set_request_structured_replies (h, false) == -1)
      goto nbd_err;
  }
  else if (nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1)
    goto nbd_err;
  r = connect_timed (h, n->uri, first ? NBD_FIRST_CONNECT_TIMEOUT_MS
                     : NBD_CONNECT_TIMEOUT_MS, quiet);
  if (r == -2) {
    snprintf (msg, msglen, "the NBD server did not complete the handshake");
    nbd_close (h);
    errno = ETIMEDOUT;
    return NULL;
  }
  if (r == -1 || (sz = nbd_get_size (h)) == -1)
    goto nbd_err;
  if (first) {
    n->size = sz;
    n->can_status =
      nbd_can_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
    n->multi = nbd_can_multi_conn (h) == 1;
    q2_debug ("%s: NBD export of %" PRIi64 " bytes, base:allocation %s, "
              "multi-conn %s", n->io.name, n->size,
              n->can_status ? "yes" : "no", n->multi ? "yes" : "no");
  }
  else if (sz != n->size) {
    snprintf (msg, msglen, "the NBD export changed size from %" PRIi64
              " to %" PRIi64 " bytes", n->size, sz);
    q2_error ("%s: %s; refusing to use it", n->io.name, msg);
    nbd_close (h);
    errno = EIO;
    return NULL;
  }
  return h;
 nbd_err:
  {
    int err = nbd_get_errno ();
    snprintf (msg, msglen, "%s", nbd_get_error ());
    (quiet ? q2_debug : q2_error) ("%s: %s", n->io.name, msg);
    if (h)
      nbd_close (h);
    errno = err ? err : EIO;
    return NULL;
  }
}

static bool
handle_dead (struct nbd_handle *h)
{
  return h == NULL || nbd_aio_is_dead (h) || nbd_aio_is_closed (h);
}

/* The link, live: after the server went away, a new connection.  0,
 * or -1 with the reason in msg.
 */
static int
link_ensure (struct nbd_io *n, struct link *l, char *msg, size_t msglen)
{
  if (!handle_dead (l->h))
    return 0;
  if (l->h)
    nbd_close (l->h);
  l->h = handle_new (n, false, l->plain, true, msg, msglen);
  if (l->h == NULL) {
    if (!l->down_logged)
      q2_error ("%s: cannot reconnect to the NBD server: %s",
                n->io.name, msg);
    l->down_logged = true;
    return -1;
  }
  if (l->down_logged)
    q2_debug ("%s: reconnected to the NBD server", n->io.name);
  l->down_logged = false;
  return 0;
}

/* ---- the connection thread ---- */

/* Did the command fail because the connection went?  (libnbd fails
 * every command in flight with ENOTCONN as a handle dies; a server
 * going down says ESHUTDOWN.)  Worth once more on a new connection.
 */
static bool
lost_connection (int err)
{
  return err == ENOTCONN || err == ESHUTDOWN || err == ECONNRESET ||
    err == EPIPE;
}

static void op_finish (struct op *o, int err, const char *msg, bool dead);
static void inflight_del (struct conn *c, struct op *o);

/* Runs in the thread, inside libnbd.  The waiter is woken at once, so
 * that it runs on the other core while we read the next reply.
 */
static int
op_complete_cb (void *user_data, int *error)
{
  struct op *o = user_data;

  if (o->cookie == -1) {
    /* Inside the call that sends it (the send failed): libnbd 1.14
     * still reads the command after this, so it is retired later by
     * cookie, and finished by reap.
     */
    o->err = *error ? *error : EIO;
    if (!o->done) {
      o->done = true;
      o->done_next = o->c->done;
      o->c->done = o;
    }
    return 0;
  }
  inflight_del (o->c, o);
  if (lost_connection (*error))
    o->c->shut = true;
  op_finish (o, *error, NULL, lost_connection (*error));
  return 1;                     /* retire it */
}

static int
op_extent_cb (void *user_data, const char *context, uint64_t offset,
              uint32_t *entries, size_t nr, int *error)
{
  struct op *o = user_data;

  if (strcmp (context, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0 || nr < 2 ||
      o->got || offset != o->off)
    return 0;
  /* Only the first extent: it starts at the requested offset. */
  o->got = true;
  o->st_len = entries[0];
  o->st_flags = entries[1];
  return 0;
}

/* The op is over: tell its waiter, and wake it after its last op. */
static void
op_finish (struct op *o, int err, const char *msg, bool dead)
{
  struct waiter *w = o->w;

  if (err && w->err == 0) {
    w->err = err;
    w->dead = dead;
    snprintf (w->msg, sizeof w->msg, "%s", msg ? msg : strerror (err));
  }
  if (--w->pending == 0)
    sem_post (&w->sem);
}

static void
inflight_add (struct conn *c, struct op *o)
{
  o->iprev = NULL;
  o->inext = c->inflight_list;
  if (o->inext)
    o->inext->iprev = o;
  c->inflight_list = o;
  c->inflight++;
}

static void
inflight_del (struct conn *c, struct op *o)
{
  if (o->iprev)
    o->iprev->inext = o->inext;
  else
    c->inflight_list = o->inext;
  if (o->inext)
    o->inext->iprev = o->iprev;
  c->inflight--;
}

/* Finish the ops whose send failed (see op_complete_cb). */
static void
reap (struct conn *c)
{
  while (c->done) {
    struct op *o = c->done;

    c->done = o->done_next;
    op_finish (o, o->err, NULL, lost_connection (o->err));
  }
}

/* Give up the connection: its server is shutting down (it answers
 * ESHUTDOWN to everything but does not hang up), or it died with
 * commands libnbd never completed (a safety net against waiting for
 * ever).  Close it first: the ops must outlive any callback.  What is
 * still in flight fails as a lost connection, to be tried again.
 */
static void
conn_drop (struct conn *c)
{
  nbd_close (c->l.h);
  c->l.h = NULL;
  reap (c);
  while (c->inflight_list) {
    struct op *o = c->inflight_list;
    inflight_del (c, o);
    op_finish (o, ENOTCONN, NULL, true);
  }
}

/* The server advertises multi-conn but takes no second client (say
 * nbdkit's limit filter): the thread takes the first connection over,
 * block status included.  False if that one is down too.
 */
static bool
take_over_sync (struct conn *c)
{
  struct nbd_io *n = c->n;
  bool ok = false;

  pthread_mutex_lock (&n->sync_lock);
  if (!handle_dead (n->sync.h)) {
    if (c->l.h)
      nbd_close (c->l.h);
    c->l = n->sync;
    n->sync.h = NULL;
    n->multi = false;
    ok = true;
    q2_debug ("%s: the NBD server takes no second client; using one "
              "connection", n->io.name);
  }
  pthread_mutex_unlock (&n->sync_lock);
  return ok;
}

static void
op_send (struct conn *c, struct op *o)
{
  nbd_completion_callback cb = { .callback = op_complete_cb,
                                 .user_data = o };
  char msg[200] = "";

  o->c = c;
  o->cookie = -1;
  o->done = false;
  o->err = 0;
  if (c->batch_failed) {
    op_finish (o, EIO, c->batch_msg, false);
    return;
  }
  if (link_ensure (c->n, &c->l, msg, sizeof msg) == -1 &&
      (c->ever || !take_over_sync (c))) {
    c->batch_failed = true;
    snprintf (c->batch_msg, sizeof c->batch_msg, "%s", msg);
    op_finish (o, EIO, msg, false);
    return;
  }
  c->ever = true;
  if (o->kind == OP_READ)
    o->cookie = nbd_aio_pread (c->l.h, o->buf, o->len, o->off, cb, 0);
  else {
    nbd_extent_callback ecb = { .callback = op_extent_cb, .user_data = o };
    o->cookie = nbd_aio_block_status (c->l.h, o->len, o->off, ecb, cb, 0);
  }
  if (o->done) {
    /* Completed (failed) inside the call: reap finishes it. */
    if (o->cookie != -1)
      nbd_aio_command_completed (c->l.h, o->cookie);
    return;
  }
  if (o->cookie == -1) {
    snprintf (msg, sizeof msg, "%s", nbd_get_error ());
    op_finish (o, EIO, msg, handle_dead (c->l.h));
    return;
  }
  inflight_add (c, o);
}

/* Wait for the socket or a wake-up, and let libnbd move on. */
static void
conn_wait (struct conn *c)
{
  struct pollfd fds[2];
  unsigned dir = 0;
  nfds_t nfds = 1;

  fds[0].fd = c->wakefd;
  fds[0].events = POLLIN;
  fds[0].revents = 0;
  if (!handle_dead (c->l.h)) {
    dir = nbd_aio_get_direction (c->l.h);
    fds[1].fd = nbd_aio_get_fd (c->l.h);
    fds[1].events = ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
      ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0);
    fds[1].revents = 0;
    nfds = fds[1].fd >= 0 ? 2 : 1;
  }
  if (poll (fds, nfds, -1) == -1)
    return;
  if (fds[0].revents & POLLIN) {
    uint64_t v;
    if (read (c->wakefd, &v, sizeof v) == -1) {
      /* EAGAIN: nothing to drain */
    }
  }
  if (nfds < 2)
    return;
  if ((dir & LIBNBD_AIO_DIRECTION_READ) &&
      (fds[1].revents & (POLLIN | POLLHUP | POLLERR)))
    nbd_aio_notify_read (c->l.h);
  else if ((dir & LIBNBD_AIO_DIRECTION_WRITE) &&
           (fds[1].revents & (POLLOUT | POLLHUP | POLLERR)))
    nbd_aio_notify_write (c->l.h);
}

/* Take what the queue holds, as far as there is room in flight. */
static struct op *
take (struct conn *c, bool *stop)
{
  struct op *list = NULL, **lt = &list;
  unsigned room = NBD_MAX_INFLIGHT - c->inflight;

  pthread_mutex_lock (&c->lock);
  *stop = c->stop;
  c->sleeping = false;
  while (c->queue && room > 0) {
    struct op *o = c->queue;
    c->queue = o->next;
    *lt = o;
    lt = &o->next;
    room--;
  }
  if (c->queue == NULL)
    c->tail = &c->queue;
  pthread_mutex_unlock (&c->lock);
  return list;
}

/* Going to wait: from now on, a caller that queues must wake us.
 * False if there is more to send first.
 */
static bool
may_sleep (struct conn *c)
{
  bool ok;

  pthread_mutex_lock (&c->lock);
  ok = c->stop == false &&
    (c->queue == NULL || c->inflight >= NBD_MAX_INFLIGHT);
  c->sleeping = ok;
  pthread_mutex_unlock (&c->lock);
  return ok;
}

static void *
conn_main (void *arg)
{
  struct conn *c = arg;
  bool stop;

  for (;;) {
    struct op *list = take (c, &stop);

    if (stop)
      break;
    c->batch_failed = false;
    while (list) {
      struct op *o = list;
      list = o->next;
      op_send (c, o);
    }
    reap (c);
    if (!may_sleep (c))
      continue;
    conn_wait (c);
    reap (c);
    if (c->l.h && (c->shut || (c->inflight_list && handle_dead (c->l.h))))
      conn_drop (c);
    c->shut = false;
  }
  return NULL;
}

/* Queue ops and sleep until they are all over.  The thread starts
 * with the first request after nbdkit's fork.
 */
static void
conn_submit (struct conn *c, struct op *ops, unsigned nops,
             struct waiter *w)
{
  bool wake_it;
  unsigned i;

  pthread_mutex_lock (&c->lock);
  if (!c->started) {
    int e;

    /* One connection only: the thread's from now on. */
    pthread_mutex_lock (&c->n->sync_lock);
    if (!c->n->multi && c->n->sync.h) {
      c->l = c->n->sync;
      c->n->sync.h = NULL;
    }
    pthread_mutex_unlock (&c->n->sync_lock);
    e = pthread_create (&c->thread, NULL, conn_main, c);
    if (e) {
      pthread_mutex_unlock (&c->lock);
      errno = e;
      q2_error ("%s: cannot start the NBD connection thread: %m",
                c->n->io.name);
      w->err = EIO;
      snprintf (w->msg, sizeof w->msg, "no connection thread");
      return;
    }
    c->started = true;
  }
  for (i = 0; i < nops; i++) {
    ops[i].w = w;
    ops[i].next = NULL;
    *c->tail = &ops[i];
    c->tail = &ops[i].next;
  }
  wake_it = c->sleeping;
  c->sleeping = false;
  pthread_mutex_unlock (&c->lock);
  if (wake_it) {
    uint64_t one = 1;
    if (write (c->wakefd, &one, sizeof one) == -1) {
      /* EAGAIN: the counter is already non-zero, it will wake */
    }
  }
  while (sem_wait (&w->sem) == -1)
    ;
}

/* On the first connection, synchronously in this thread: everything
 * before the fork, and block status on servers with multi-conn.  False
 * if the first connection is the thread's (threaded: after the fork).
 */
static bool
run_sync (struct nbd_io *n, struct op *ops, unsigned nops, struct waiter *w,
          bool threaded)
{
  unsigned i;

  pthread_mutex_lock (&n->sync_lock);
  if (threaded && !n->multi) {
    pthread_mutex_unlock (&n->sync_lock);
    return false;
  }
  for (i = 0; i < nops && w->err == 0; i++) {
    struct op *o = &ops[i];
    char msg[200] = "";
    int r;

    if (link_ensure (n, &n->sync, msg, sizeof msg) == -1) {
      w->err = EIO;
      snprintf (w->msg, sizeof w->msg, "%s", msg);
      break;
    }
    if (o->kind == OP_READ)
      r = nbd_pread (n->sync.h, o->buf, o->len, o->off, 0);
    else {
      nbd_extent_callback ecb = { .callback = op_extent_cb, .user_data = o };
      r = nbd_block_status (n->sync.h, o->len, o->off, ecb, 0);
    }
    if (r == -1) {
      w->err = nbd_get_errno () ? nbd_get_errno () : EIO;
      /* An idle connection learns that the server went only now; one
       * whose server is shutting down answers ESHUTDOWN for ever.
       */
      w->dead = handle_dead (n->sync.h) || lost_connection (w->err);
      if (w->dead) {
        nbd_close (n->sync.h);
        n->sync.h = NULL;
      }
      snprintf (w->msg, sizeof w->msg, "%s", nbd_get_error ());
    }
  }
  pthread_mutex_unlock (&n->sync_lock);
  return true;
}

/* Run ops; once more on a new connection if the old one died under
 * them (the server was restarted since its last use).  0, or an errno
 * with the message in w->msg.
 */
static int
run_ops (struct nbd_io *n, struct op *ops, unsigned nops, struct waiter *w,
         const char *what, uint64_t off)
{
  int attempt;

  for (attempt = 0; attempt < 2; attempt++) {
    bool threaded = __atomic_load_n (&threads_allowed, __ATOMIC_ACQUIRE);

    w->pending = nops;
    w->err = 0;
    w->dead = false;
    w->msg[0] = '\0';
    if ((threaded && ops[0].kind == OP_READ) ||
        !run_sync (n, ops, nops, w, threaded))
      conn_submit (&n->conn, ops, nops, w);
    if (w->err == 0 || !w->dead)
      break;
    q2_debug ("%s: %s at offset %" PRIu64 ": %s; reconnecting",
              n->io.name, what, off, w->msg);
  }
  return w->err;
}

static int
nbd_io_pread (struct q2_io *io, void *buf, size_t cnt, uint64_t off)
{
  struct nbd_io *n = (struct nbd_io *) io;
  struct op ops[NBD_MAX_PIECES];
  struct waiter w;
  char *p = buf;
  size_t avail;
  int err = 0;

  /* Past the end of the export reads as zeros, as for files. */
  avail = off < (uint64_t) n->size ? (uint64_t) n->size - off : 0;
  if (avail > cnt)
    avail = cnt;
  memset (p + avail, 0, cnt - avail);

  sem_init (&w.sem, 0, 0);
  while (avail > 0 && err == 0) {
    uint64_t start = off;
    unsigned nops = 0;

    for (; avail > 0 && nops < NBD_MAX_PIECES; nops++) {
      size_t l = avail < NBD_MAX_REQUEST ? avail : NBD_MAX_REQUEST;

      ops[nops] = (struct op) { .kind = OP_READ, .buf = p, .len = l,
                                .off = off };
      p += l;
      off += l;
      avail -= l;
    }
    err = run_ops (n, ops, nops, &w, "read", start);
    if (err)
      q2_error ("%s: read at offset %" PRIu64 " failed: %s",
                io->name, start, w.msg);
  }
  sem_destroy (&w.sem);
  if (err) {
    errno = EIO;
    return -1;
  }
  return 0;
}

static int
nbd_io_pwrite (struct q2_io *io, const void *buf, size_t cnt, uint64_t off)
{
  return Q2_FAIL (EROFS, "%s: NBD backing files are read-only", io->name);
}

static int
nbd_io_flush (struct q2_io *io)
{
  return 0;
}

static int64_t
nbd_io_size (struct q2_io *io)
{
  return ((struct nbd_io *) io)->size;
}

/* HOLE and ZERO pass through as the server reports them (the NBD
 * flag values are ours).  Without base:allocation: data.
 */
static int
nbd_io_status (struct q2_io *io, uint64_t off, uint64_t cnt,
               uint64_t *len, unsigned *flags)
{
  struct nbd_io *n = (struct nbd_io *) io;
  struct op o;
  struct waiter w;
  int err;

  *len = cnt;
  *flags = 0;
  if (off >= (uint64_t) n->size) {
    *flags = Q2_STATUS_HOLE | Q2_STATUS_ZERO;
    return 0;
  }
  if (cnt > (uint64_t) n->size - off)
    cnt = *len = n->size - off;
  if (!n->can_status)
    return 0;
  if (cnt > 1 << 30)
    cnt = 1 << 30;
  o = (struct op) { .kind = OP_STATUS, .len = cnt, .off = off };
  sem_init (&w.sem, 0, 0);
  err = run_ops (n, &o, 1, &w, "block status", off);
  sem_destroy (&w.sem);
  if (err)
    return Q2_FAIL (EIO, "%s: block status at offset %" PRIu64 " failed: %s",
                    io->name, off, w.msg);
  if (o.got && o.st_len > 0) {
    *len = o.st_len < cnt ? o.st_len : cnt;
    *flags = ((o.st_flags & LIBNBD_STATE_HOLE) ? Q2_STATUS_HOLE : 0) |
      ((o.st_flags & LIBNBD_STATE_ZERO) ? Q2_STATUS_ZERO : 0);
  }
  return 0;
}

static void
nbd_io_close (struct q2_io *io)
{
  struct nbd_io *n = (struct nbd_io *) io;
  struct conn *c = &n->conn;

  if (c->started) {
    uint64_t one = 1;

    pthread_mutex_lock (&c->lock);
    c->stop = true;
    pthread_mutex_unlock (&c->lock);
    if (write (c->wakefd, &one, sizeof one) == -1) {
      /* the counter is non-zero already */
    }
    pthread_join (c->thread, NULL);
  }
  if (c->l.h)
    nbd_close (c->l.h);
  if (n->sync.h)
    nbd_close (n->sync.h);
  close (c->wakefd);
  pthread_mutex_destroy (&c->lock);
  pthread_mutex_destroy (&n->sync_lock);
  free (n->uri);
}

static const struct q2_io_ops nbd_ops = {
  .pread = nbd_io_pread,
  .pwrite = nbd_io_pwrite,
  .flush = nbd_io_flush,
  .size = nbd_io_size,
  .status = nbd_io_status,
  .close = nbd_io_close,
};

static void
nbd_io_free (struct nbd_io *n)
{
  int e = errno;

  if (n->conn.wakefd >= 0)
    close (n->conn.wakefd);
  free (n->uri);
  free (n->io.name);
  free (n);
  errno = e;
}

struct q2_io *
q2_io_nbd_open (const char *name)
{
  struct nbd_io *n = calloc (1, sizeof *n);
  char msg[200];

  if (n == NULL) {
    q2_error ("%s: calloc: %m", name);
    return NULL;
  }
  n->conn.wakefd = -1;
  n->uri = q2_nbd_name_to_uri (name);
  n->io.name = strdup (name);
  if (n->uri == NULL || n->io.name == NULL) {
    if (n->uri && n->io.name == NULL)
      q2_error ("%s: strdup: %m", name);
    nbd_io_free (n);
    return NULL;
  }
  n->conn.wakefd = eventfd (0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (n->conn.wakefd == -1) {
    q2_error ("%s: eventfd: %m", name);
    nbd_io_free (n);
    return NULL;
  }
  n->io.ops = &nbd_ops;
  n->io.readonly = true;
  n->io.remote = true;
  n->conn.n = n;
  n->conn.tail = &n->conn.queue;
  n->sync.h = handle_new (n, true, false, false, msg, sizeof msg);
  if (n->sync.h == NULL) {
    nbd_io_free (n);
    return NULL;
  }
  n->conn.l.plain = n->multi;
  pthread_mutex_init (&n->conn.lock, NULL);
  pthread_mutex_init (&n->sync_lock, NULL);
  return &n->io;
}
