/* nbdkit-qcow2: the LUKS1 header inside a qcow2 image.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Layout (all big-endian): magic "LUKS\xba\xbe", version 1, cipher
 * name, cipher mode ("xts-plain64", "cbc-essiv:sha256"), hash, payload
 * offset and key size, the master-key digest with its salt and
 * iterations, a UUID, then 8 key slots of 48 bytes.  Each active slot
 * holds the master key split into 4000 stripes (the anti-forensic
 * split), encrypted with a key derived from the password by PBKDF2.
 * Offsets count 512-byte sectors from the start of the LUKS area.
 */

#include <config.h>

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/random.h>

#include <nettle/nettle-meta.h>

#include "qcow2-internal.h"
#include "qcow2-crypto.h"
#include "qcow2-luks.h"

#define L_MAGIC 0
#define L_VERSION 6
#define L_CIPHER_NAME 8
#define L_CIPHER_MODE 40
#define L_HASH_SPEC 72
#define L_PAYLOAD 104
#define L_KEY_BYTES 108
#define L_MK_DIGEST 112
#define L_MK_SALT 132
#define L_MK_ITER 164
#define L_UUID 168
#define L_SLOTS 208
#define L_SLOT_SIZE 48
#define L_NSLOTS 8
#define L_NAME_LEN 32
#define L_DIGEST_LEN 20
#define L_SALT_LEN 32

#define S_ACTIVE 0
#define S_ITER 4
#define S_SALT 8
#define S_KMO 40
#define S_STRIPES 44

#define SLOT_ON 0x00AC71F3U
#define SLOT_OFF 0x0000DEADU

static const uint8_t magic[6] = { 'L', 'U', 'K', 'S', 0xba, 0xbe };

struct luks {
  char cipher[L_NAME_LEN + 1], mode[L_NAME_LEN + 1], hash[L_NAME_LEN + 1];
  char cmode[L_NAME_LEN + 1], ivgen[L_NAME_LEN + 1], ivhash[L_NAME_LEN + 1];
  const struct nettle_hash *h;
  uint32_t key_bytes, mk_iter, payload;
  const uint8_t *mk_digest, *mk_salt;
  struct {
    bool on;
    uint32_t iter, kmo, stripes;
    const uint8_t *salt;
  } slot[L_NSLOTS];
};

/* Bytes of one slot's encrypted key material, whole sectors. */
static uint64_t
material_len (uint32_t key_bytes, uint32_t stripes)
{
  uint64_t n = (uint64_t) key_bytes * stripes;

  return (n + Q2_SECTOR - 1) / Q2_SECTOR * Q2_SECTOR;
}

static int
get_name (const char *fname, const uint8_t *hdr, unsigned off,
          const char *what, char *out)
{
  if (memchr (hdr + off, 0, L_NAME_LEN) == NULL)
    return Q2_FAIL (EINVAL, "%s: LUKS header: %s at offset %u is not "
                    "NUL-terminated", fname, what, off);
  memcpy (out, hdr + off, L_NAME_LEN);
  out[L_NAME_LEN] = '\0';
  return 0;
}

/* "xts-plain64" -> xts, plain64; "cbc-essiv:sha256" -> cbc, essiv,
 * sha256; "ecb" -> ecb.
 */
static void
split_mode (const char *m, char *mode, char *ivgen, char *ivhash)
{
  const char *dash = strchr (m, '-'), *colon;

  ivgen[0] = ivhash[0] = '\0';
  if (dash == NULL) {
    strcpy (mode, m);
    return;
  }
  memcpy (mode, m, dash - m);
  mode[dash - m] = '\0';
  colon = strchr (dash + 1, ':');
  if (colon == NULL) {
    strcpy (ivgen, dash + 1);
    return;
  }
  memcpy (ivgen, dash + 1, colon - (dash + 1));
  ivgen[colon - (dash + 1)] = '\0';
  strcpy (ivhash, colon + 1);
}

static int
parse (const char *fname, const uint8_t *hdr, uint64_t area_len,
       struct luks *l)
{
  struct q2_crypto *test;
  uint8_t zkey[Q2_MAX_KEY] = { 0 };
  char err[200];
  unsigned i, j, n_on = 0;

  if (memcmp (hdr + L_MAGIC, magic, sizeof magic) != 0)
    return Q2_FAIL (EINVAL, "%s: LUKS header: bad magic", fname);
  if (get_be16 (hdr + L_VERSION) != 1)
    return Q2_FAIL (ENOTSUP, "%s: LUKS header: unsupported version %u "
                    "(only LUKS1 is used by qcow2)", fname,
                    get_be16 (hdr + L_VERSION));
  if (get_name (fname, hdr, L_CIPHER_NAME, "cipher name", l->cipher) == -1 ||
      get_name (fname, hdr, L_CIPHER_MODE, "cipher mode", l->mode) == -1 ||
      get_name (fname, hdr, L_HASH_SPEC, "hash", l->hash) == -1)
    return -1;
  l->h = q2_hash_lookup (l->hash);
  if (l->h == NULL)
    return Q2_FAIL (ENOTSUP, "%s: LUKS header: unsupported hash '%s'",
                    fname, l->hash);
  l->key_bytes = get_be32 (hdr + L_KEY_BYTES);
  if (l->key_bytes == 0 || l->key_bytes > Q2_MAX_KEY)
    return Q2_FAIL (EINVAL, "%s: LUKS header: invalid key size %" PRIu32
                    " bytes", fname, l->key_bytes);
  split_mode (l->mode, l->cmode, l->ivgen, l->ivhash);
  /* Keying a throw-away cipher validates the whole combination. */
  if (q2_crypto_new (l->cipher, l->cmode, l->ivgen[0] ? l->ivgen : NULL,
                     l->ivhash[0] ? l->ivhash : NULL, zkey, l->key_bytes,
                     &test, err, sizeof err) == -1)
    return Q2_FAIL (ENOTSUP, "%s: LUKS header: cipher %s, mode %s, %" PRIu32
                    "-bit key: %s", fname, l->cipher, l->mode,
                    l->key_bytes * 8, err);
  q2_crypto_free (test);
  l->payload = get_be32 (hdr + L_PAYLOAD);
  l->mk_digest = hdr + L_MK_DIGEST;
  l->mk_salt = hdr + L_MK_SALT;
  l->mk_iter = get_be32 (hdr + L_MK_ITER);
  if (l->mk_iter == 0 || l->mk_iter > Q2_LUKS_MAX_ITER)
    return Q2_FAIL (EINVAL, "%s: LUKS header: master-key digest iterations "
                    "%" PRIu32 " out of range (1 to %" PRIu32 ")", fname,
                    l->mk_iter, Q2_LUKS_MAX_ITER);

  for (i = 0; i < L_NSLOTS; i++) {
    const uint8_t *s = hdr + L_SLOTS + i * L_SLOT_SIZE;
    uint32_t active = get_be32 (s + S_ACTIVE);
    uint64_t start, end;

    if (active != SLOT_ON && active != SLOT_OFF)
      return Q2_FAIL (EINVAL, "%s: LUKS header: key slot %u has an invalid "
                      "state 0x%08" PRIx32, fname, i, active);
    l->slot[i].on = active == SLOT_ON;
    l->slot[i].iter = get_be32 (s + S_ITER);
    l->slot[i].salt = s + S_SALT;
    l->slot[i].kmo = get_be32 (s + S_KMO);
    l->slot[i].stripes = get_be32 (s + S_STRIPES);
    if (l->slot[i].stripes != Q2_LUKS_STRIPES)
      return Q2_FAIL (EINVAL, "%s: LUKS header: key slot %u has %" PRIu32
                      " stripes (must be %d)", fname, i, l->slot[i].stripes,
                      Q2_LUKS_STRIPES);
    start = (uint64_t) l->slot[i].kmo * Q2_SECTOR;
    end = start + material_len (l->key_bytes, Q2_LUKS_STRIPES);
    if (start < Q2_LUKS_HEADER_SIZE || end > area_len)
      return Q2_FAIL (EINVAL, "%s: LUKS header: key slot %u material at "
                      "sector %" PRIu32 " lies outside the LUKS area of %"
                      PRIu64 " bytes", fname, i, l->slot[i].kmo, area_len);
    if (end > (uint64_t) l->payload * Q2_SECTOR)
      return Q2_FAIL (EINVAL, "%s: LUKS header: key slot %u material "
                      "overlaps the payload (sector %" PRIu32 ")", fname, i,
                      l->payload);
    for (j = 0; j < i; j++) {
      uint64_t s2 = (uint64_t) l->slot[j].kmo * Q2_SECTOR;
      uint64_t e2 = s2 + material_len (l->key_bytes, Q2_LUKS_STRIPES);

      if (start < e2 && s2 < end)
        return Q2_FAIL (EINVAL, "%s: LUKS header: key slots %u and %u "
                        "overlap", fname, j, i);
    }
    if (!l->slot[i].on)
      continue;
    n_on++;
    if (l->slot[i].iter == 0 || l->slot[i].iter > Q2_LUKS_MAX_ITER)
      return Q2_FAIL (EINVAL, "%s: LUKS header: key slot %u iterations %"
                      PRIu32 " out of range (1 to %" PRIu32 ")", fname, i,
                      l->slot[i].iter, Q2_LUKS_MAX_ITER);
  }
  if (n_on == 0)
    return Q2_FAIL (EINVAL, "%s: LUKS header: no active key slot", fname);
  return 0;
}

/* The anti-forensic diffuser: hash each digest-sized chunk with its
 * big-endian index in front, in place.
 */
static void
diffuse (const struct nettle_hash *h, uint8_t *buf, size_t len)
{
  size_t ds = h->digest_size, j, n;
  uint8_t out[Q2_MAX_DIGEST], idx[4];

  for (j = 0; j * ds < len; j++) {
    n = len - j * ds < ds ? len - j * ds : ds;
    put_be32 (idx, j);
    q2_hash_buf (h, idx, 4, buf + j * ds, n, out);
    memcpy (buf + j * ds, out, n);
  }
  explicit_bzero (out, sizeof out);
}

static void
xor_into (uint8_t *d, const uint8_t *s, size_t n)
{
  size_t i;

  for (i = 0; i < n; i++)
    d[i] ^= s[i];
}

/* Merge the stripes in material into mk. */
static void
af_merge (const struct nettle_hash *h, const uint8_t *material,
          uint32_t key_bytes, uint8_t *mk)
{
  unsigned i;

  memset (mk, 0, key_bytes);
  for (i = 0; i < Q2_LUKS_STRIPES - 1; i++) {
    xor_into (mk, material + (size_t) i * key_bytes, key_bytes);
    diffuse (h, mk, key_bytes);
  }
  xor_into (mk, material + (size_t) i * key_bytes, key_bytes);
}

static int
new_data_cipher (const char *fname, const struct luks *l, const uint8_t *key,
                 struct q2_crypto **out)
{
  char err[200];

  if (q2_crypto_new (l->cipher, l->cmode, l->ivgen[0] ? l->ivgen : NULL,
                     l->ivhash[0] ? l->ivhash : NULL, key, l->key_bytes,
                     out, err, sizeof err) == -1)
    return Q2_FAIL (EINVAL, "%s: LUKS: %s", fname, err);
  return 0;
}

/* Try one slot: 1 if it unlocks (mk filled), 0 if not, -1 on error. */
static int
try_slot (const char *fname, struct q2_io *io, uint64_t off,
          const struct luks *l, unsigned i, const char *password,
          uint8_t *material, uint8_t *mk)
{
  uint64_t mlen = material_len (l->key_bytes, Q2_LUKS_STRIPES);
  uint8_t slotkey[Q2_MAX_KEY], digest[L_DIGEST_LEN];
  struct q2_crypto *c;
  int r;

  q2_pbkdf2 (l->h, password, strlen (password), l->slot[i].salt, L_SALT_LEN,
             l->slot[i].iter, slotkey, l->key_bytes);
  r = new_data_cipher (fname, l, slotkey, &c);
  explicit_bzero (slotkey, sizeof slotkey);
  if (r == -1)
    return -1;
  r = q2_io_pread (io, material, mlen, off + (uint64_t) l->slot[i].kmo * Q2_SECTOR);
  if (r == 0)
    q2_crypto_decrypt (c, 0, material, material, mlen);
  q2_crypto_free (c);
  if (r == -1)
    return -1;
  af_merge (l->h, material, l->key_bytes, mk);
  q2_pbkdf2 (l->h, mk, l->key_bytes, l->mk_salt, L_SALT_LEN, l->mk_iter,
             digest, L_DIGEST_LEN);
  return memcmp (digest, l->mk_digest, L_DIGEST_LEN) == 0;
}

int
q2_luks_open (const char *fname, struct q2_io *io, uint64_t off, uint64_t len,
              const char *password, struct q2_crypto **out)
{
  uint8_t hdr[Q2_LUKS_HEADER_SIZE], mk[Q2_MAX_KEY];
  struct luks l;
  uint8_t *material = NULL;
  uint64_t mlen;
  unsigned i;
  int r = 0;

  if (len < Q2_LUKS_HEADER_SIZE)
    return Q2_FAIL (EINVAL, "%s: LUKS area at 0x%" PRIx64 " is only %" PRIu64
                    " bytes long", fname, off, len);
  if (q2_io_pread (io, hdr, sizeof hdr, off) == -1)
    return -1;
  memset (&l, 0, sizeof l);
  if (parse (fname, hdr, len, &l) == -1)
    return -1;
  mlen = material_len (l.key_bytes, Q2_LUKS_STRIPES);
  material = malloc (mlen);
  if (material == NULL)
    return Q2_FAIL (ENOMEM, "%s: malloc: %m", fname);
  q2_debug ("%s: LUKS: cipher %s-%u, mode %s, hash %s", fname, l.cipher,
            l.cmode[0] == 'x' ? l.key_bytes * 4 : l.key_bytes * 8,
            l.mode, l.hash);
  for (i = 0; i < L_NSLOTS; i++) {
    if (!l.slot[i].on)
      continue;
    r = try_slot (fname, io, off, &l, i, password, material, mk);
    if (r != 0)
      break;
  }
  explicit_bzero (material, mlen);
  free (material);
  if (r == 1) {
    q2_debug ("%s: LUKS: key slot %u unlocked", fname, i);
    r = new_data_cipher (fname, &l, mk, out);
  }
  else if (r == 0)
    r = Q2_FAIL (EACCES, "%s: invalid password: no LUKS key slot accepts it",
                 fname);
  explicit_bzero (mk, sizeof mk);
  return r;
}

/* ---- building a header ---- */

static double
now_ms (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* PBKDF2 iterations per millisecond with this hash. */
static double
pbkdf2_rate (const struct nettle_hash *h, size_t key_bytes)
{
  uint8_t salt[L_SALT_LEN] = { 0 }, out[Q2_MAX_KEY];
  unsigned iter = 1000;
  double t, dt;

  for (;;) {
    t = now_ms ();
    q2_pbkdf2 (h, "calibrate", 9, salt, sizeof salt, iter, out, key_bytes);
    dt = now_ms () - t;
    if (dt >= 50 || iter >= (1U << 28))
      break;
    iter *= 2;
  }
  return iter / (dt > 0.001 ? dt : 0.001);
}

static uint32_t
iterations (double rate, uint64_t ms)
{
  double n = rate * ms;

  if (n < Q2_LUKS_MIN_ITER)
    return Q2_LUKS_MIN_ITER;
  if (n > Q2_LUKS_MAX_ITER)
    return Q2_LUKS_MAX_ITER;
  return (uint32_t) n;
}

static int
random_bytes (void *buf, size_t n)
{
  uint8_t *p = buf;

  while (n > 0) {
    ssize_t r = getrandom (p, n, 0);

    if (r == -1) {
      if (errno == EINTR)
        continue;
      return Q2_FAIL (errno, "getrandom: %m");
    }
    p += r;
    n -= r;
  }
  return 0;
}

/* "aes-256" -> "aes", 32 bytes. */
static int
parse_alg (const char *s, char *alg, size_t *keylen)
{
  const char *dash = strrchr (s, '-');
  unsigned bits;

  if (dash == NULL || dash - s >= L_NAME_LEN ||
      sscanf (dash + 1, "%u", &bits) != 1 || bits % 8)
    return -1;
  memcpy (alg, s, dash - s);
  alg[dash - s] = '\0';
  *keylen = bits / 8;
  return q2_cipher_known (alg, *keylen) ? 0 : -1;
}

int
q2_luks_build_header (const char *password, const struct q2_luks_params *p,
                      uint8_t **hdr_out, uint64_t *hdr_len)
{
  static const struct q2_luks_params defaults = { NULL };
  const char *calg, *cmode, *ivgen, *ivhash, *hname;
  char alg[L_NAME_LEN], mode[L_NAME_LEN * 2], err[200], uuid[40];
  const struct nettle_hash *h;
  size_t keylen, key_bytes, stripe_len, i;
  uint64_t ms, area_sectors, mlen, len;
  uint8_t mk[Q2_MAX_KEY], slotkey[Q2_MAX_KEY], d[Q2_MAX_KEY], u[16];
  uint8_t *hdr = NULL, *material = NULL, *s;
  struct q2_crypto *c = NULL;
  double rate;
  int r = -1;

  if (p == NULL)
    p = &defaults;
  calg = p->cipher_alg ? p->cipher_alg : "aes-256";
  cmode = p->cipher_mode ? p->cipher_mode : "xts";
  ivgen = p->ivgen_alg ? p->ivgen_alg : "plain64";
  ivhash = p->ivgen_hash_alg ? p->ivgen_hash_alg : "sha256";
  hname = p->hash_alg ? p->hash_alg : "sha256";
  ms = p->iter_time_ms ? p->iter_time_ms : 2000;

  if (parse_alg (calg, alg, &keylen) == -1)
    return Q2_FAIL (ENOTSUP, "LUKS: unsupported cipher '%s'", calg);
  h = q2_hash_lookup (hname);
  if (h == NULL)
    return Q2_FAIL (ENOTSUP, "LUKS: unsupported hash '%s'", hname);
  key_bytes = strcmp (cmode, "xts") == 0 ? keylen * 2 : keylen;
  if (strcmp (ivgen, "essiv") == 0)
    snprintf (mode, sizeof mode, "%s-%s:%s", cmode, ivgen, ivhash);
  else
    snprintf (mode, sizeof mode, "%s-%s", cmode, ivgen);
  if (strlen (mode) >= L_NAME_LEN)
    return Q2_FAIL (ENOTSUP, "LUKS: cipher mode '%s' is too long", mode);
  /* Validates the combination (e.g. ESSIV's derived key size). */
  memset (mk, 0, sizeof mk);
  if (q2_crypto_new (alg, cmode, ivgen, ivhash, mk, key_bytes, &c,
                     err, sizeof err) == -1)
    return Q2_FAIL (ENOTSUP, "LUKS: cipher %s, mode %s: %s", calg, mode, err);
  q2_crypto_free (c);
  c = NULL;

  stripe_len = key_bytes * Q2_LUKS_STRIPES;
  mlen = material_len (key_bytes, Q2_LUKS_STRIPES);
  area_sectors = (mlen / Q2_SECTOR + 7) / 8 * 8;
  len = (8 + L_NSLOTS * area_sectors) * Q2_SECTOR;
  hdr = calloc (1, len);
  material = calloc (1, mlen);
  if (hdr == NULL || material == NULL) {
    r = Q2_FAIL (ENOMEM, "malloc: %m");
    goto out;
  }
  if (random_bytes (mk, key_bytes) == -1 ||
      random_bytes (hdr + L_MK_SALT, L_SALT_LEN) == -1 ||
      random_bytes (hdr + L_SLOTS + S_SALT, L_SALT_LEN) == -1 ||
      random_bytes (material, stripe_len - key_bytes) == -1 ||
      random_bytes (u, sizeof u) == -1)
    goto out;

  rate = pbkdf2_rate (h, key_bytes);
  memcpy (hdr + L_MAGIC, magic, sizeof magic);
  put_be16 (hdr + L_VERSION, 1);
  strcpy ((char *) hdr + L_CIPHER_NAME, alg);
  strcpy ((char *) hdr + L_CIPHER_MODE, mode);
  strcpy ((char *) hdr + L_HASH_SPEC, hname);
  put_be32 (hdr + L_PAYLOAD, 8 + L_NSLOTS * area_sectors);
  put_be32 (hdr + L_KEY_BYTES, key_bytes);
  put_be32 (hdr + L_MK_ITER, iterations (rate, ms / 8));
  q2_pbkdf2 (h, mk, key_bytes, hdr + L_MK_SALT, L_SALT_LEN,
             get_be32 (hdr + L_MK_ITER), hdr + L_MK_DIGEST, L_DIGEST_LEN);
  u[6] = (u[6] & 0x0f) | 0x40;          /* a random (version 4) UUID */
  u[8] = (u[8] & 0x3f) | 0x80;
  snprintf (uuid, sizeof uuid, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-"
            "%02x%02x%02x%02x%02x%02x", u[0], u[1], u[2], u[3], u[4], u[5],
            u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
  memcpy (hdr + L_UUID, uuid, 36);
  for (i = 0; i < L_NSLOTS; i++) {
    s = hdr + L_SLOTS + i * L_SLOT_SIZE;
    put_be32 (s + S_ACTIVE, i == 0 ? SLOT_ON : SLOT_OFF);
    put_be32 (s + S_KMO, 8 + i * area_sectors);
    put_be32 (s + S_STRIPES, Q2_LUKS_STRIPES);
  }
  s = hdr + L_SLOTS;
  put_be32 (s + S_ITER, iterations (rate, ms));

  /* AF split: random stripes 0..3998, the last one makes the merge
   * come out as mk.
   */
  memset (d, 0, sizeof d);
  for (i = 0; i < Q2_LUKS_STRIPES - 1; i++) {
    xor_into (d, material + i * key_bytes, key_bytes);
    diffuse (h, d, key_bytes);
  }
  memcpy (material + i * key_bytes, d, key_bytes);
  xor_into (material + i * key_bytes, mk, key_bytes);

  q2_pbkdf2 (h, password, strlen (password), s + S_SALT, L_SALT_LEN,
             get_be32 (s + S_ITER), slotkey, key_bytes);
  r = q2_crypto_new (alg, cmode, ivgen, ivhash, slotkey, key_bytes, &c,
                     err, sizeof err);
  if (r == -1) {
    r = Q2_FAIL (EINVAL, "LUKS: %s", err);
    goto out;
  }
  q2_crypto_encrypt (c, 0, hdr + (uint64_t) 8 * Q2_SECTOR, material, mlen);
  q2_crypto_free (c);
  *hdr_out = hdr;
  *hdr_len = len;
  hdr = NULL;
  r = 0;

 out:
  explicit_bzero (mk, sizeof mk);
  explicit_bzero (slotkey, sizeof slotkey);
  explicit_bzero (d, sizeof d);
  if (material) {
    explicit_bzero (material, mlen);
    free (material);
  }
  free (hdr);
  return r;
}
