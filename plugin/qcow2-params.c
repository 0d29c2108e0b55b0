/* nbdkit-qcow2: parameters shared by the plugin and the filter.
 * SPDX-License-Identifier: BSD-3-Clause
 */

#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "qcow2-params.h"
#include "qcow2-nbd.h"
#include "qcow2-format.h"
#include "qcow2-luks.h"

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

/* ---- create=true ---- */

static int
one_of (const char *key, const char *value, const char *const *list)
{
  size_t i;

  for (i = 0; list[i]; i++)
    if (strcmp (value, list[i]) == 0)
      return i;
  {
    char all[256] = "";
    for (i = 0; list[i]; i++) {
      if (i > 0)
        strncat (all, "|", sizeof all - strlen (all) - 1);
      strncat (all, list[i], sizeof all - strlen (all) - 1);
    }
    nbdkit_error ("%s=%s is not one of the accepted values: %s",
                  key, value, all);
  }
  return -1;
}

static bool
one_of_quiet (const char *value, const char *const *list)
{
  size_t i;

  for (i = 0; list[i]; i++)
    if (strcmp (value, list[i]) == 0)
      return true;
  return false;
}

static const char *const bool_keys[] = {
  "extended-l2", "lazy-refcounts", "data-file-raw", NULL
};
/* The names qemu-img accepts for the LUKS options. */
static const char *const cipher_algs[] = {
  "aes-128", "aes-192", "aes-256", "des-rfb", "3des", "cast5-128",
  "serpent-128", "serpent-192", "serpent-256",
  "twofish-128", "twofish-192", "twofish-256", "sm4", NULL
};
static const char *const cipher_modes[] = {
  "ecb", "cbc", "xts", "ctr", NULL
};
static const char *const ivgen_algs[] = {
  "plain", "plain64", "essiv", NULL
};
static const char *const hash_algs[] = {
  "md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160", NULL
};

/* Returns 1 if key is not a creation option. */
static int
config_create (const char *key, const char *value)
{
  struct q2_params *p = &q2_params;
  struct q2_create_opts *o = &p->create_opts;
  int64_t r;
  int i;

  if (strcmp (key, "create") == 0) {
    if ((i = nbdkit_parse_bool (value)) == -1)
      return -1;
    p->create = i;
    return 0;
  }

  if (strcmp (key, "size") == 0) {
    if ((r = nbdkit_parse_size (value)) == -1)
      return -1;
    o->size = r;
    o->size_set = true;
  }
  else if (strcmp (key, "cluster-size") == 0) {
    if ((r = nbdkit_parse_size (value)) == -1)
      return -1;
    if (r == 0) {
      nbdkit_error ("cluster-size must not be 0");
      return -1;
    }
    o->cluster_size = r;
  }
  else if (strcmp (key, "compat") == 0) {
    static const char *const v[] = { "0.10", "v2", "1.1", "v3", NULL };
    if ((i = one_of (key, value, v)) == -1)
      return -1;
    o->version = i < 2 ? 2 : 3;
  }
  else if (strcmp (key, "refcount-bits") == 0) {
    unsigned u;
    if (nbdkit_parse_unsigned (key, value, &u) == -1)
      return -1;
    if (u == 0) {
      nbdkit_error ("refcount-bits must not be 0");
      return -1;
    }
    o->refcount_bits = u;
  }
  else if (one_of_quiet (key, bool_keys)) {
    if ((i = nbdkit_parse_bool (value)) == -1)
      return -1;
    if (strcmp (key, "extended-l2") == 0)
      o->extended_l2 = i;
    else if (strcmp (key, "lazy-refcounts") == 0)
      o->lazy_refcounts = i;
    else
      o->data_file_raw = i;
  }
  else if (strcmp (key, "compression-type") == 0) {
    static const char *const v[] = { "zlib", "zstd", NULL };
    if ((i = one_of (key, value, v)) == -1)
      return -1;
    o->compression_type =
      i == 0 ? QCOW2_COMPRESSION_DEFLATE : QCOW2_COMPRESSION_ZSTD;
  }
  else if (strcmp (key, "preallocation") == 0) {
    static const char *const v[] = {
      "off", "metadata", "falloc", "full", NULL
    };
    if ((i = one_of (key, value, v)) == -1)
      return -1;
    o->prealloc = i;
  }
  else if (strcmp (key, "encrypt-format") == 0) {
    static const char *const v[] = { "aes", "luks", NULL };
    if ((i = one_of (key, value, v)) == -1)
      return -1;
    o->crypt_method = i == 0 ? QCOW2_CRYPT_AES : QCOW2_CRYPT_LUKS;
  }
  else if (strcmp (key, "encrypt-cipher-alg") == 0) {
    if (one_of (key, value, cipher_algs) == -1)
      return -1;
    p->luks.cipher_alg = value;         /* nbdkit keeps value alive */
  }
  else if (strcmp (key, "encrypt-cipher-mode") == 0) {
    if (one_of (key, value, cipher_modes) == -1)
      return -1;
    p->luks.cipher_mode = value;
  }
  else if (strcmp (key, "encrypt-ivgen-alg") == 0) {
    if (one_of (key, value, ivgen_algs) == -1)
      return -1;
    p->luks.ivgen_alg = value;
  }
  else if (strcmp (key, "encrypt-ivgen-hash-alg") == 0) {
    if (one_of (key, value, hash_algs) == -1)
      return -1;
    p->luks.ivgen_hash_alg = value;
  }
  else if (strcmp (key, "encrypt-hash-alg") == 0) {
    if (one_of (key, value, hash_algs) == -1)
      return -1;
    p->luks.hash_alg = value;
  }
  else if (strcmp (key, "encrypt-iter-time") == 0) {
    uint64_t ms;
    if (nbdkit_parse_uint64_t (key, value, &ms) == -1)
      return -1;
    if (ms == 0) {
      nbdkit_error ("encrypt-iter-time must be at least 1 (milliseconds)");
      return -1;
    }
    p->luks.iter_time_ms = ms;
  }
  else
    return 1;

  if (p->create_only_key == NULL)
    p->create_only_key = key;
  return 0;
}

/* Check the creation options once every key is known. */
static int
complete_create (void)
{
  struct q2_params *p = &q2_params;
  struct q2_create_opts o;

  if (!p->create) {
    if (p->create_only_key) {
      const char *pfx = p->opts.param_prefix ? p->opts.param_prefix : "";
      nbdkit_error ("%s%s= is only valid with %screate=true",
                    pfx, p->create_only_key, pfx);
      return -1;
    }
    return 0;
  }
  if (p->snapshot) {
    nbdkit_error ("snapshot= cannot be used with create=true: a new "
                  "image has no snapshots");
    return -1;
  }
  if (p->backing && strcmp (p->backing, "none") == 0) {
    nbdkit_error ("backing=none cannot be used with create=true "
                  "(leave backing= out for an image without one)");
    return -1;
  }
  if (p->create_opts.crypt_method != QCOW2_CRYPT_LUKS &&
      (p->luks.cipher_alg || p->luks.cipher_mode || p->luks.ivgen_alg ||
       p->luks.ivgen_hash_alg || p->luks.hash_alg || p->luks.iter_time_ms)) {
    nbdkit_error ("the encrypt-cipher-alg, -cipher-mode, -ivgen-alg, "
                  "-ivgen-hash-alg, -hash-alg and -iter-time options "
                  "apply only to encrypt-format=luks");
    return -1;
  }
  if (p->create_opts.crypt_method != QCOW2_CRYPT_NONE &&
      p->password == NULL) {
    nbdkit_error ("encrypt-format= needs password=");
    return -1;
  }
  p->create_opts.backing = p->backing;
  p->create_opts.backing_format = p->opts.backing_format;
  p->create_opts.data_file = p->data_file;

  /* Report bad combinations now, before anything is created. */
  o = p->create_opts;
  return q2_create_check (&o);
}

char *
q2_params_create_path (const char *file)
{
  const char *slash = strrchr (file, '/');
  const char *base = slash ? slash + 1 : file;
  char *dir, *rdir, *out;
  struct stat st;

  if (*base == '\0' || strcmp (base, ".") == 0 || strcmp (base, "..") == 0) {
    nbdkit_error ("file=%s does not name a file to create", file);
    return NULL;
  }
  if (lstat (file, &st) == 0) {
    nbdkit_error ("%s: already exists; create=true never replaces a file",
                  file);
    return NULL;
  }
  if (errno != ENOENT) {
    nbdkit_error ("%s: %m", file);
    return NULL;
  }
  dir = slash ? strndup (file, slash == file ? 1 : slash - file)
    : strdup (".");
  if (dir == NULL) {
    nbdkit_error ("strdup: %m");
    return NULL;
  }
  rdir = nbdkit_realpath (dir);
  free (dir);
  if (rdir == NULL)
    return NULL;
  if (asprintf (&out, "%s%s%s", rdir,
                rdir[strlen (rdir) - 1] == '/' ? "" : "/", base) == -1) {
    nbdkit_error ("asprintf: %m");
    out = NULL;
  }
  free (rdir);
  return out;
}

/* encrypt-format=luks: the LUKS area, built by the same code that
 * unlocks images (NULL options mean qemu-img's defaults).  *hdr is
 * malloc'd; the caller wipes and frees it.
 */
static int
build_luks_area (const struct q2_params *p, uint8_t **hdr, uint64_t *len)
{
  struct q2_luks_params lp = {
    .cipher_alg = p->luks.cipher_alg,
    .cipher_mode = p->luks.cipher_mode,
    .ivgen_alg = p->luks.ivgen_alg,
    .ivgen_hash_alg = p->luks.ivgen_hash_alg,
    .hash_alg = p->luks.hash_alg,
    .iter_time_ms = p->luks.iter_time_ms,
  };

  if (q2_luks_build_header (p->password, &lp, hdr, len) == -1) {
    nbdkit_error ("encrypt-format=luks: cannot build the LUKS header: %m");
    return -1;
  }
  return 0;
}

int
q2_params_create (const char *filename)
{
  struct q2_params *p = &q2_params;
  struct q2_create_opts o = p->create_opts;
  uint8_t *hdr = NULL;
  uint64_t len = 0;
  int r;

  if (o.crypt_method == QCOW2_CRYPT_LUKS) {
    if (build_luks_area (p, &hdr, &len) == -1)
      return -1;
    o.luks_hdr = hdr;
    o.luks_len = len;
  }
  r = q2_create (filename, &o);
  if (hdr) {
    explicit_bzero (hdr, len);
    free (hdr);
  }
  return r;
}

int
q2_params_config (const char *key, const char *value)
{
  struct q2_params *p = &q2_params;
  int k, cr;

  for (k = Q2_SNAP_CREATE; k <= Q2_SNAP_DELETE; k++)
    if (strcmp (key, snap_keys[k]) == 0)
      return config_snapshot_op (k, value);
  if ((cr = config_create (key, value)) != 1)
    return cr;

  if (strcmp (key, "backing") == 0) {
    /* NBD names (URIs, nbd:..., json:...) are not paths. */
    if (strcmp (value, "none") == 0 || q2_nbd_is_name (value))
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
  if (strcmp (key, "allow-remote-backing") == 0) {
    int r = nbdkit_parse_bool (value);
    if (r == -1)
      return -1;
    p->opts.allow_remote_backing = r;
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
  return complete_create ();
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
