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
 *    threads at once.  When the server advertises multi-conn, reads go
 *    over a pool of connections (up to NBD_POOL_MAX, made on demand in
 *    nbdkit's worker threads, so after the fork): a thread takes an
 *    idle connection and does one synchronous round trip on it, with no
 *    hand-off to, or wake-up by, another thread (see pool_pread).  What
 *    follows covers the rest: servers without multi-conn, block status,
 *    reads larger than one request, and requests beyond the pool.
 *
 *    A synchronous libnbd call holds its handle for the
 *    whole round trip, so requests go out with the asynchronous API
 *    (nbd_aio_pread, nbd_aio_block_status) and many are in flight on one
 *    connection.  The waiting threads take turns at driving the socket
 *    (see req_wait); there is no thread of our own.  When the server
 *    advertises multi-conn, requests are spread over up to NBD_MAX_CONNS
 *    connections.  Without multi-conn we keep to one connection: some
 *    servers (qemu-nbd without --shared) accept only one client.
 *    Measured (bench workloads j and k, nbdkit file as the server, a
 *    loaded 2-core machine): one connection with requests in flight and
 *    four connections were within the noise of each other for 4k random
 *    reads (p/q 1.28-1.61 against 1.21-1.88), so we keep both: four when
 *    the server allows it, which never hurt, one otherwise.  A read-only
 *    backing would be safe on several connections even without
 *    multi-conn (nobody writes it), but the server may refuse them.
 *
 *    The first connection is made at open time, so that a bad address
 *    fails startup with libnbd's message.  If a connection dies (the
 *    server went away), its requests fail with EIO and a logged message,
 *    and the next request makes a new connection: a restarted server
 *    heals the export.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
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

/* ---------------------------------------------------------------- */
/* I/O over libnbd */

#ifndef NBD_MAX_CONNS
#define NBD_MAX_CONNS 4
#endif
/* Pool connections (multi-conn servers); see pool_get. */
#ifndef NBD_POOL_MAX
#define NBD_POOL_MAX 16
#endif
/* Largest piece of one request; pieces of a large read go out together. */
#define NBD_MAX_REQUEST (4 * 1024 * 1024)
#define NBD_MAX_PIECES 16

struct conn {
  struct nbd_handle *h;
  int wakefd;                   /* eventfd: wake the polling thread */
  bool polling;                 /* a thread is polling (under done_lock) */
  pthread_t poller;             /* that thread (under done_lock) */
  struct req *waiters;          /* requests waiting (under done_lock) */
  unsigned users;               /* requests using it (under nbd_io.lock) */
  bool orphan;                  /* dead and replaced: free at users == 0 */
  struct conn *pool_next;       /* in nbd_io.pool (idle) */
};

struct nbd_io {
  struct q2_io io;
  char *uri;
  int64_t size;
  bool can_status;              /* base:allocation negotiated */
  unsigned max_conns;
  pthread_mutex_t lock;         /* conns[] */
  struct conn *conns[NBD_MAX_CONNS];
  unsigned next;                /* round robin */
  bool down_logged;
  /* Multi-conn servers: a pool of connections, each used by one
   * thread at a time with libnbd's synchronous calls (see pool_pread).
   */
  pthread_mutex_t pool_lock;
  struct conn *pool;            /* idle connections */
  unsigned pool_n;              /* connections of the pool, idle or not */
  unsigned pool_max;            /* 0: no pool */
};

/* Completion: shared by every request. */
static pthread_mutex_t done_lock = PTHREAD_MUTEX_INITIALIZER;

/* One request (some pieces in flight).  Its owner sleeps on cond, which
 * is signalled when the last piece completes, or when the owner is
 * handed the job of polling the connection.
 */
struct req {
  unsigned pending;             /* under done_lock */
  int err;
  pthread_cond_t cond;
  struct req *next;             /* in conn->waiters */
  struct conn *c;
  bool polling;                 /* its owner polls c (under done_lock) */
};

static void wake (struct conn *c);

static int
complete_cb (void *user_data, int *error)
{
  struct req *r = user_data;

  pthread_mutex_lock (&done_lock);
  if (*error && r->err == 0)
    r->err = *error;
  if (--r->pending == 0) {
    pthread_cond_signal (&r->cond);
    /* A thread submitting a command may read replies too (libnbd runs
     * the state machine as far as it can without blocking); if it read
     * the reply the poller waits for, the poller must not sleep on in
     * poll().
     */
    if (r->polling && !pthread_equal (r->c->poller, pthread_self ()))
      wake (r->c);
  }
  pthread_mutex_unlock (&done_lock);
  /* Not retired here: libnbd 1.14's nbd_aio_* read the command again
   * after a failed send may already have completed it, so the owner
   * retires it with nbd_aio_command_completed once it has the cookie.
   */
  return 0;
}

static bool
conn_dead (struct conn *c)
{
  return nbd_aio_is_dead (c->h) || nbd_aio_is_closed (c->h);
}

/* Wait once for the socket (or a wake-up) and let libnbd move on.
 * Completion callbacks run in here.
 */
static void
poll_once (struct conn *c)
{
  struct pollfd fds[2];
  unsigned dir;
  int fd;

  if (conn_dead (c))
    return;
  fd = nbd_aio_get_fd (c->h);
  dir = nbd_aio_get_direction (c->h);
  if (fd == -1)
    return;
  fds[0].fd = fd;
  fds[0].events = ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
    ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0);
  fds[0].revents = 0;
  fds[1].fd = c->wakefd;
  fds[1].events = POLLIN;
  fds[1].revents = 0;
  if (poll (fds, 2, -1) == -1)
    return;
  if (fds[1].revents & POLLIN) {
    uint64_t v;
    if (read (c->wakefd, &v, sizeof v) == -1) {
      /* already drained by someone else */
    }
  }
  if ((dir & LIBNBD_AIO_DIRECTION_READ) &&
      (fds[0].revents & (POLLIN | POLLHUP | POLLERR)))
    nbd_aio_notify_read (c->h);
  else if ((dir & LIBNBD_AIO_DIRECTION_WRITE) &&
           (fds[0].revents & (POLLOUT | POLLHUP | POLLERR)))
    nbd_aio_notify_write (c->h);
}

static void
wake (struct conn *c)
{
  uint64_t one = 1;

  if (write (c->wakefd, &one, sizeof one) == -1) {
    /* EAGAIN: the counter is already non-zero, the poller will wake */
  }
}

/* Wait for every piece of r.  There is no thread of our own (threads
 * would not survive nbdkit's fork into the background, and one started
 * before the fork would stay in the parent, reading our socket): the
 * waiting threads take turns at polling the connection.  One polls; the
 * others sleep until their own request completes or the poller leaves
 * and hands the job on.
 */
static void
req_wait (struct conn *c, struct req *r)
{
  struct req **pp;

  pthread_mutex_lock (&done_lock);
  r->next = c->waiters;
  c->waiters = r;
  while (r->pending > 0) {
    if (c->polling) {
      pthread_cond_wait (&r->cond, &done_lock);
      continue;
    }
    __atomic_store_n (&c->polling, true, __ATOMIC_RELAXED);
    c->poller = pthread_self ();
    r->polling = true;
    pthread_mutex_unlock (&done_lock);
    poll_once (c);
    pthread_mutex_lock (&done_lock);
    r->polling = false;
    __atomic_store_n (&c->polling, false, __ATOMIC_RELAXED);
    if (r->pending > 0 && conn_dead (c)) {
      /* libnbd completes every command when the handle dies; this is
       * a safety net against waiting forever.
       */
      r->err = r->err ? r->err : ENOTCONN;
      break;
    }
  }
  for (pp = &c->waiters; *pp != r; pp = &(*pp)->next)
    ;
  *pp = r->next;
  /* Someone must go on polling for the others. */
  if (!c->polling && c->waiters)
    pthread_cond_signal (&c->waiters->cond);
  pthread_mutex_unlock (&done_lock);
}

static void
req_init (struct req *r, struct conn *c)
{
  r->c = c;
  r->polling = false;
  r->pending = 0;
  r->err = 0;
  r->next = NULL;
  pthread_cond_init (&r->cond, NULL);
}

/* After submitting: if the command could not be sent at once and a
 * thread sleeps in poll() waiting only to read, wake it so that it
 * writes.
 */
static void
kick (struct conn *c)
{
  if (__atomic_load_n (&c->polling, __ATOMIC_RELAXED) &&
      (nbd_aio_get_direction (c->h) & LIBNBD_AIO_DIRECTION_WRITE))
    wake (c);
}

static void
conn_free (struct conn *c)
{
  if (c == NULL)
    return;
  if (c->h)
    nbd_close (c->h);
  if (c->wakefd >= 0)
    close (c->wakefd);
  free (c);
}

/* Later connections are made while requests wait (under nbd_io.lock),
 * so they must not hang: a server that advertises multi-conn may still
 * leave extra clients waiting in its backlog.
 */
#define NBD_CONNECT_TIMEOUT_MS 5000

static int
connect_timed (struct nbd_handle *h, const char *uri, bool quiet)
{
  struct timespec t0, t;
  long ms;

  clock_gettime (CLOCK_MONOTONIC, &t0);
  if (nbd_aio_connect_uri (h, uri) == -1)
    return -1;
  while (nbd_aio_is_connecting (h)) {
    clock_gettime (CLOCK_MONOTONIC, &t);
    ms = (t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000;
    if (ms >= NBD_CONNECT_TIMEOUT_MS) {
      (quiet ? q2_debug : q2_error)
        ("%s: the NBD server did not complete the handshake within %d ms",
         uri, NBD_CONNECT_TIMEOUT_MS);
      errno = ETIMEDOUT;
      return -2;
    }
    if (nbd_poll (h, NBD_CONNECT_TIMEOUT_MS - ms) == -1)
      return -1;
  }
  if (!nbd_aio_is_ready (h))
    return -1;
  return 0;
}

/* Connect; report failures with libnbd's message (only as debug
 * messages when quiet: the caller has a way out).
 */
static struct conn *
conn_new (struct nbd_io *n, const char *name, bool first, bool quiet,
          bool plain)
{
  struct conn *c = calloc (1, sizeof *c);

  if (c == NULL) {
    q2_error ("%s: calloc: %m", name);
    return NULL;
  }
  c->wakefd = eventfd (0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (c->wakefd == -1) {
    q2_error ("%s: eventfd: %m", name);
    free (c);
    return NULL;
  }
  c->h = nbd_create ();
  if (c->h == NULL)
    goto nbd_err;
  if (plain) {
    /* Reads only: simple replies cost the server and us fewer system
     * calls than structured ones (one header, then the data).
     */
    if (nbd_set_request_structured_replies (c->h, false) == -1)
      goto nbd_err;
  }
  else if (nbd_add_meta_context (c->h, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1)
    goto nbd_err;
  if (first) {
    if (nbd_connect_uri (c->h, n->uri) == -1)
      goto nbd_err;
  }
  else {
    int r = connect_timed (c->h, n->uri, quiet);
    if (r == -2) {
      conn_free (c);
      errno = ETIMEDOUT;
      return NULL;
    }
    if (r == -1)
      goto nbd_err;
  }
  if (first) {
    n->size = nbd_get_size (c->h);
    if (n->size == -1)
      goto nbd_err;
    n->can_status =
      nbd_can_meta_context (c->h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
    n->max_conns = nbd_can_multi_conn (c->h) == 1 ? NBD_MAX_CONNS : 1;
    n->pool_max = n->max_conns > 1 ? NBD_POOL_MAX : 0;
    q2_debug ("%s: NBD export of %" PRIi64 " bytes, base:allocation %s, "
              "multi-conn %s", name, n->size, n->can_status ? "yes" : "no",
              n->max_conns > 1 ? "yes" : "no");
  }
  else {
    int64_t sz = nbd_get_size (c->h);
    if (sz == -1)
      goto nbd_err;
    if (sz != n->size) {
      q2_error ("%s: the NBD export changed size from %" PRIi64 " to %"
                PRIi64 " bytes; refusing to use it", name, n->size, sz);
      conn_free (c);
      errno = EIO;
      return NULL;
    }
  }
  return c;
 nbd_err:
  {
    int err = nbd_get_errno ();
    (quiet ? q2_debug : q2_error) ("%s: %s", name, nbd_get_error ());
    conn_free (c);
    errno = err ? err : EIO;
    return NULL;
  }
}

/* A connection for one request, with c->users raised; fresh: a new
 * one (after a failure, the others may be stale too).  NULL (reported,
 * errno EIO) if the server cannot be reached.
 */
static struct conn *
conn_get (struct nbd_io *n, bool fresh)
{
  struct conn *c;
  unsigned i;

  pthread_mutex_lock (&n->lock);
  i = n->next++ % n->max_conns;
  c = n->conns[i];
  if (c && (fresh || conn_dead (c))) {
    /* Replace it; requests still using it free it when they finish. */
    if (c->users == 0)
      conn_free (c);
    else
      c->orphan = true;
    c = n->conns[i] = NULL;
  }
  if (c == NULL) {
    bool spare = i > 0 && !fresh && n->conns[0] && !conn_dead (n->conns[0]);

    c = conn_new (n, n->io.name, false, spare, false);
    if (c == NULL && spare) {
      /* The server advertises multi-conn but will not take another
       * client: keep to the one connection we have.
       */
      q2_debug ("%s: cannot open another connection to the NBD server; "
                "using one", n->io.name);
      n->max_conns = 1;
      pthread_mutex_lock (&n->pool_lock);
      n->pool_max = n->pool_n;
      pthread_mutex_unlock (&n->pool_lock);
      c = n->conns[0];
    }
    else if (c == NULL) {
      n->down_logged = true;
      pthread_mutex_unlock (&n->lock);
      q2_error ("%s: cannot reconnect to the NBD server", n->io.name);
      errno = EIO;
      return NULL;
    }
    else {
      n->conns[i] = c;
      if (n->down_logged)
        q2_debug ("%s: reconnected to the NBD server", n->io.name);
      n->down_logged = false;
    }
  }
  c->users++;
  pthread_mutex_unlock (&n->lock);
  return c;
}

static void
conn_put (struct nbd_io *n, struct conn *c)
{
  pthread_mutex_lock (&n->lock);
  if (--c->users == 0 && c->orphan)
    conn_free (c);
  pthread_mutex_unlock (&n->lock);
}

/* The pool.  With multi-conn, a thread takes an idle connection for
 * its request and does one synchronous round trip on it: no hand-offs
 * between threads, no wake-ups, one connection per request in flight
 * (up to NBD_POOL_MAX; beyond that, requests share the round-robin
 * connections above).  Connections are made on demand in nbdkit's
 * worker threads, so after the fork into the background.
 */
/* An idle pool connection, or a new one (fresh: always a new one).
 * NULL: none to be had now; the caller uses the shared connections.
 */
static struct conn *
pool_get (struct nbd_io *n, bool fresh)
{
  struct conn *c;

  pthread_mutex_lock (&n->pool_lock);
  if (!fresh && n->pool) {
    c = n->pool;
    n->pool = c->pool_next;
    pthread_mutex_unlock (&n->pool_lock);
    return c;
  }
  if (n->pool_n >= n->pool_max) {
    pthread_mutex_unlock (&n->pool_lock);
    return NULL;
  }
  n->pool_n++;
  pthread_mutex_unlock (&n->pool_lock);

  c = conn_new (n, n->io.name, false, true, true);
  if (c == NULL) {
    int e = errno;

    pthread_mutex_lock (&n->pool_lock);
    n->pool_n--;
    if (e == ETIMEDOUT) {
      /* It advertises multi-conn but leaves new clients waiting: grow
       * no further.
       */
      q2_debug ("%s: the NBD server takes no more clients; pool of %u "
                "connections", n->io.name, n->pool_n);
      n->pool_max = n->pool_n;
    }
    pthread_mutex_unlock (&n->pool_lock);
    if (e == ETIMEDOUT) {
      /* Nor will the shared connections find a spare one. */
      pthread_mutex_lock (&n->lock);
      n->max_conns = 1;
      pthread_mutex_unlock (&n->lock);
    }
  }
  return c;
}

static void
pool_put (struct nbd_io *n, struct conn *c)
{
  bool dead = conn_dead (c);

  pthread_mutex_lock (&n->pool_lock);
  if (dead)
    n->pool_n--;
  else {
    c->pool_next = n->pool;
    n->pool = c;
  }
  pthread_mutex_unlock (&n->pool_lock);
  if (dead)
    conn_free (c);
}

/* One read on a pool connection.  Returns 0, an errno (message in
 * msg), or -1: no pool connection to be had, use the shared ones.  A
 * connection found dead (the server was restarted) is dropped and the
 * read tried once more on a new one.
 */
static int
pool_pread (struct nbd_io *n, void *p, size_t len, uint64_t off,
            char *msg, size_t msglen)
{
  bool fresh = false;
  int err = -1, attempt;

  for (attempt = 0; attempt < 2; attempt++) {
    struct conn *c = pool_get (n, fresh);
    bool dead;

    if (c == NULL)
      return -1;
    if (nbd_pread (c->h, p, len, off, 0) == 0) {
      pool_put (n, c);
      return 0;
    }
    snprintf (msg, msglen, "%s", nbd_get_error ());
    err = nbd_get_errno ();
    if (err == 0)
      err = EIO;
    dead = conn_dead (c);
    pool_put (n, c);
    if (!dead)
      break;
    q2_debug ("%s: read at offset %" PRIu64 ": %s; reconnecting",
              n->io.name, off, msg);
    msg[0] = '\0';
    fresh = true;
  }
  return err;
}

/* One batch of up to NBD_MAX_PIECES requests, in flight together.
 * Returns 0, or an errno with the message in msg.  *dead: on entry,
 * use a new connection; on return, the connection died (worth one
 * retry on a new one).
 */
static int
read_batch (struct nbd_io *n, char *p, size_t len, uint64_t off,
            char *msg, size_t msglen, bool *dead)
{
  struct req r;
  struct conn *c = conn_get (n, *dead);
  int64_t cookies[NBD_MAX_PIECES];
  unsigned nc = 0, i;

  *dead = false;
  if (c == NULL) {
    snprintf (msg, msglen, "no connection to the NBD server");
    return EIO;
  }
  req_init (&r, c);
  while (len > 0) {
    size_t l = len < NBD_MAX_REQUEST ? len : NBD_MAX_REQUEST;
    nbd_completion_callback cb = { .callback = complete_cb, .user_data = &r };

    pthread_mutex_lock (&done_lock);
    r.pending++;
    pthread_mutex_unlock (&done_lock);
    int64_t ck = nbd_aio_pread (c->h, p, l, off, cb, 0);

    if (ck == -1) {
      snprintf (msg, msglen, "%s", nbd_get_error ());
      pthread_mutex_lock (&done_lock);
      r.pending--;
      if (r.err == 0)
        r.err = EIO;
      pthread_mutex_unlock (&done_lock);
      break;
    }
    cookies[nc++] = ck;
    p += l;
    off += l;
    len -= l;
  }
  kick (c);
  req_wait (c, &r);
  pthread_cond_destroy (&r.cond);
  for (i = 0; i < nc; i++)
    nbd_aio_command_completed (c->h, cookies[i]);
  if (r.err) {
    *dead = conn_dead (c);
    if (msg[0] == '\0')
      snprintf (msg, msglen, "%s", strerror (r.err));
  }
  conn_put (n, c);
  return r.err;
}

static int
nbd_io_pread (struct q2_io *io, void *buf, size_t cnt, uint64_t off)
{
  struct nbd_io *n = (struct nbd_io *) io;
  char *p = buf;
  size_t avail;

  /* Past the end of the export reads as zeros, as for files. */
  avail = off < (uint64_t) n->size ? (uint64_t) n->size - off : 0;
  if (avail > cnt)
    avail = cnt;
  memset (p + avail, 0, cnt - avail);

  if (n->pool_max && avail > 0 && avail <= NBD_MAX_REQUEST) {
    char msg[256] = "";
    int err = pool_pread (n, p, avail, off, msg, sizeof msg);

    if (err == 0)
      return 0;
    if (err > 0)
      return Q2_FAIL (EIO, "%s: read at offset %" PRIu64 " failed: %s",
                      io->name, off, msg);
  }

  while (avail > 0) {
    size_t len = avail < (size_t) NBD_MAX_PIECES * NBD_MAX_REQUEST
      ? avail : (size_t) NBD_MAX_PIECES * NBD_MAX_REQUEST;
    char msg[256] = "";
    bool dead = false;
    int err = read_batch (n, p, len, off, msg, sizeof msg, &dead);

    if (err && dead) {
      /* A connection that died since its last use (the server was
       * restarted): once more on a new connection.
       */
      q2_debug ("%s: read at offset %" PRIu64 ": %s; reconnecting",
                io->name, off, msg);
      msg[0] = '\0';
      err = read_batch (n, p, len, off, msg, sizeof msg, &dead);
    }
    if (err)
      return Q2_FAIL (EIO, "%s: read at offset %" PRIu64 " failed: %s",
                      io->name, off, msg);
    p += len;
    off += len;
    avail -= len;
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

struct status_req {
  struct req r;
  uint64_t off;
  uint64_t len;
  uint32_t flags;               /* NBD base:allocation flags */
  bool got;
};

static int
extent_cb (void *user_data, const char *context, uint64_t offset,
           uint32_t *entries, size_t nr, int *error)
{
  struct status_req *s = user_data;

  if (strcmp (context, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0 || nr < 2 ||
      s->got || offset != s->off)
    return 0;
  /* Only the first extent: it starts at the requested offset. */
  s->got = true;
  s->len = entries[0];
  s->flags = entries[1];
  return 0;
}

static int
status_once (struct nbd_io *n, uint64_t off, uint64_t cnt,
             struct status_req *s, char *msg, size_t msglen, bool *dead)
{
  nbd_extent_callback ecb = { .callback = extent_cb, .user_data = s };
  nbd_completion_callback ccb = { .callback = complete_cb,
                                  .user_data = &s->r };
  struct conn *c = conn_get (n, *dead);
  int64_t ck;

  *dead = false;
  *s = (struct status_req) { .off = off };
  if (c == NULL) {
    snprintf (msg, msglen, "no connection to the NBD server");
    return EIO;
  }
  req_init (&s->r, c);
  s->r.pending = 1;
  ck = nbd_aio_block_status (c->h, cnt, off, ecb, ccb, 0);
  if (ck == -1) {
    snprintf (msg, msglen, "%s", nbd_get_error ());
    s->r.pending = 0;
    s->r.err = EIO;
  }
  kick (c);
  req_wait (c, &s->r);
  pthread_cond_destroy (&s->r.cond);
  if (ck != -1)
    nbd_aio_command_completed (c->h, ck);
  if (s->r.err) {
    *dead = conn_dead (c);
    if (msg[0] == '\0')
      snprintf (msg, msglen, "%s", strerror (s->r.err));
  }
  conn_put (n, c);
  return s->r.err;
}

/* HOLE and ZERO pass through as the server reports them (the NBD
 * flag values are ours).  Without base:allocation: data.
 */
static int
nbd_io_status (struct q2_io *io, uint64_t off, uint64_t cnt,
               uint64_t *len, unsigned *flags)
{
  struct nbd_io *n = (struct nbd_io *) io;
  struct status_req s;
  char msg[256] = "";
  bool dead = false;
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
  err = status_once (n, off, cnt, &s, msg, sizeof msg, &dead);
  if (err && dead) {
    q2_debug ("%s: block status at offset %" PRIu64 ": %s; reconnecting",
              io->name, off, msg);
    msg[0] = '\0';
    err = status_once (n, off, cnt, &s, msg, sizeof msg, &dead);
  }
  if (err)
    return Q2_FAIL (EIO, "%s: block status at offset %" PRIu64 " failed: %s",
                    io->name, off, msg);
  if (s.got && s.len > 0) {
    *len = s.len < cnt ? s.len : cnt;
    *flags = ((s.flags & LIBNBD_STATE_HOLE) ? Q2_STATUS_HOLE : 0) |
      ((s.flags & LIBNBD_STATE_ZERO) ? Q2_STATUS_ZERO : 0);
  }
  return 0;
}

static void
nbd_io_close (struct q2_io *io)
{
  struct nbd_io *n = (struct nbd_io *) io;
  unsigned i;

  for (i = 0; i < NBD_MAX_CONNS; i++)
    conn_free (n->conns[i]);
  while (n->pool) {
    struct conn *c = n->pool;
    n->pool = c->pool_next;
    conn_free (c);
  }
  pthread_mutex_destroy (&n->lock);
  pthread_mutex_destroy (&n->pool_lock);
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

struct q2_io *
q2_io_nbd_open (const char *name)
{
  struct nbd_io *n = calloc (1, sizeof *n);

  if (n == NULL) {
    q2_error ("%s: calloc: %m", name);
    return NULL;
  }
  n->uri = q2_nbd_name_to_uri (name);
  n->io.name = strdup (name);
  if (n->uri == NULL || n->io.name == NULL) {
    if (n->uri && n->io.name == NULL)
      q2_error ("%s: strdup: %m", name);
    free (n->uri);
    free (n->io.name);
    free (n);
    return NULL;
  }
  pthread_mutex_init (&n->lock, NULL);
  pthread_mutex_init (&n->pool_lock, NULL);
  n->io.ops = &nbd_ops;
  n->io.readonly = true;
  n->io.remote = true;
  n->conns[0] = conn_new (n, name, true, false, false);
  if (n->conns[0] == NULL) {
    int e = errno;
    pthread_mutex_destroy (&n->lock);
    pthread_mutex_destroy (&n->pool_lock);
    free (n->uri);
    free (n->io.name);
    free (n);
    errno = e;
    return NULL;
  }
  return &n->io;
}
