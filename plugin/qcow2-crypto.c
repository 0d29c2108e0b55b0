/* nbdkit-qcow2: sector ciphers, hashes and PBKDF2 over nettle.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * nettle does the ciphers, modes, hashes, HMAC and PBKDF2.  What it
 * lacks is written here: the IV generators (plain, plain64, ESSIV) and
 * the glue that picks a cipher by name and key size.
 */

#include <config.h>

#include <endian.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nettle/nettle-meta.h>
#include <nettle/cbc.h>
#include <nettle/ctr.h>
#include <nettle/xts.h>
#include <nettle/hmac.h>
#include <nettle/pbkdf2.h>
#include <nettle/sha1.h>
#include <nettle/sha2.h>
#include <nettle/ripemd160.h>

#include "qcow2-crypto.h"

/* ---- hashes ---- */

union hash_ctx {
  struct sha1_ctx sha1;
  struct sha256_ctx sha256;
  struct sha512_ctx sha512;
  struct ripemd160_ctx ripemd160;
};

static const struct {
  const char *name;
  const struct nettle_hash *h;
} hashes[] = {
  { "sha1", &nettle_sha1 },
  { "sha224", &nettle_sha224 },
  { "sha256", &nettle_sha256 },
  { "sha384", &nettle_sha384 },
  { "sha512", &nettle_sha512 },
  { "ripemd160", &nettle_ripemd160 },
};

const struct nettle_hash *
q2_hash_lookup (const char *name)
{
  size_t i;

  for (i = 0; i < sizeof hashes / sizeof hashes[0]; i++)
    if (strcmp (name, hashes[i].name) == 0)
      return hashes[i].h;
  return NULL;
}

unsigned
q2_hash_size (const struct nettle_hash *h)
{
  return h->digest_size;
}

void
q2_hash_buf (const struct nettle_hash *h, const void *a, size_t alen,
             const void *b, size_t blen, uint8_t *digest)
{
  union hash_ctx ctx;

  h->init (&ctx);
  h->update (&ctx, alen, a);
  if (blen)
    h->update (&ctx, blen, b);
  h->digest (&ctx, h->digest_size, digest);
  explicit_bzero (&ctx, sizeof ctx);
}

/* HMAC over any of the hashes above, for nettle's generic pbkdf2. */
struct hmac_any {
  const struct nettle_hash *h;
  union hash_ctx outer, inner, state;
};

static void
hmac_any_update (void *p, size_t len, const uint8_t *data)
{
  struct hmac_any *m = p;

  hmac_update (&m->state, m->h, len, data);
}

static void
hmac_any_digest (void *p, size_t len, uint8_t *out)
{
  struct hmac_any *m = p;

  hmac_digest (&m->outer, &m->inner, &m->state, m->h, len, out);
}

void
q2_pbkdf2 (const struct nettle_hash *h, const void *pw, size_t pwlen,
           const uint8_t *salt, size_t saltlen, unsigned iterations,
           uint8_t *out, size_t outlen)
{
  struct hmac_any m;

  m.h = h;
  hmac_set_key (&m.outer, &m.inner, &m.state, h, pwlen, pw);
  pbkdf2 (&m, hmac_any_update, hmac_any_digest, h->digest_size,
          iterations ? iterations : 1, saltlen, salt, outlen, out);
  explicit_bzero (&m, sizeof m);
}

/* ---- ciphers ---- */

static const struct {
  const char *alg;
  size_t keylen;
  const struct nettle_cipher *c;
} ciphers[] = {
  { "aes", 16, &nettle_aes128 },
  { "aes", 24, &nettle_aes192 },
  { "aes", 32, &nettle_aes256 },
  { "twofish", 16, &nettle_twofish128 },
  { "twofish", 24, &nettle_twofish192 },
  { "twofish", 32, &nettle_twofish256 },
  { "serpent", 16, &nettle_serpent128 },
  { "serpent", 24, &nettle_serpent192 },
  { "serpent", 32, &nettle_serpent256 },
  { "cast5", 16, &nettle_cast128 },
};

static const struct nettle_cipher *
cipher_lookup (const char *alg, size_t keylen)
{
  size_t i;

  for (i = 0; i < sizeof ciphers / sizeof ciphers[0]; i++)
    if (strcmp (alg, ciphers[i].alg) == 0 && keylen == ciphers[i].keylen)
      return ciphers[i].c;
  return NULL;
}

int
q2_cipher_known (const char *alg, size_t keylen)
{
  return cipher_lookup (alg, keylen) != NULL;
}

enum mode { M_ECB, M_CBC, M_CTR, M_XTS };
enum ivgen { IV_NONE, IV_PLAIN, IV_PLAIN64, IV_ESSIV };

struct q2_crypto {
  const struct nettle_cipher *ci;
  const struct nettle_cipher *essiv_ci;
  enum mode mode;
  enum ivgen iv;
  unsigned bs;                  /* block size = IV size */
  void *enc, *dec, *twk, *essiv;
};

static void *
keyed (const struct nettle_cipher *ci, bool encrypt, const uint8_t *key)
{
  void *ctx = calloc (1, ci->context_size);

  if (ctx)
    (encrypt ? ci->set_encrypt_key : ci->set_decrypt_key) (ctx, key);
  return ctx;
}

static void
wipe_free (void *p, size_t n)
{
  if (p) {
    explicit_bzero (p, n);
    free (p);
  }
}

void
q2_crypto_free (struct q2_crypto *c)
{
  if (c == NULL)
    return;
  wipe_free (c->enc, c->ci->context_size);
  wipe_free (c->dec, c->ci->context_size);
  wipe_free (c->twk, c->ci->context_size);
  if (c->essiv_ci)
    wipe_free (c->essiv, c->essiv_ci->context_size);
  explicit_bzero (c, sizeof *c);
  free (c);
}

int
q2_crypto_new (const char *alg, const char *mode, const char *ivgen,
               const char *ivhash, const uint8_t *key, size_t keylen,
               struct q2_crypto **out, char *err, size_t errlen)
{
  struct q2_crypto *c = calloc (1, sizeof *c);
  size_t ckeylen = keylen;

  if (c == NULL) {
    snprintf (err, errlen, "malloc: %s", strerror (errno));
    return -1;
  }
  if (strcmp (mode, "ecb") == 0) c->mode = M_ECB;
  else if (strcmp (mode, "cbc") == 0) c->mode = M_CBC;
  else if (strcmp (mode, "ctr") == 0) c->mode = M_CTR;
  else if (strcmp (mode, "xts") == 0) c->mode = M_XTS;
  else {
    snprintf (err, errlen, "unsupported cipher mode '%s'", mode);
    goto fail;
  }
  if (c->mode == M_XTS) {
    if (keylen % 2) {
      snprintf (err, errlen, "XTS key of %zu bytes is not a pair", keylen);
      goto fail;
    }
    ckeylen = keylen / 2;
  }
  c->ci = cipher_lookup (alg, ckeylen);
  if (c->ci == NULL) {
    snprintf (err, errlen, "unsupported cipher %s with a %zu-bit key",
              alg, ckeylen * 8);
    goto fail;
  }
  c->bs = c->ci->block_size;
  if (c->mode == M_XTS && c->bs != 16) {
    snprintf (err, errlen, "XTS needs a 128-bit block cipher, not %s", alg);
    goto fail;
  }
  if (ivgen == NULL || c->mode == M_ECB)
    c->iv = IV_NONE;
  else if (strcmp (ivgen, "plain") == 0) c->iv = IV_PLAIN;
  else if (strcmp (ivgen, "plain64") == 0) c->iv = IV_PLAIN64;
  else if (strcmp (ivgen, "essiv") == 0) c->iv = IV_ESSIV;
  else {
    snprintf (err, errlen, "unsupported IV generator '%s'", ivgen);
    goto fail;
  }
  if (c->iv == IV_NONE && c->mode != M_ECB) {
    snprintf (err, errlen, "cipher mode %s needs an IV generator", mode);
    goto fail;
  }

  c->enc = keyed (c->ci, true, key);
  c->dec = keyed (c->ci, false, key);
  if (c->mode == M_XTS)
    c->twk = keyed (c->ci, true, key + ckeylen);
  if (c->enc == NULL || c->dec == NULL || (c->mode == M_XTS && !c->twk)) {
    snprintf (err, errlen, "malloc: %s", strerror (ENOMEM));
    goto fail;
  }
  if (c->iv == IV_ESSIV) {
    const struct nettle_hash *h = ivhash ? q2_hash_lookup (ivhash) : NULL;
    uint8_t hk[Q2_MAX_DIGEST];

    if (h == NULL) {
      snprintf (err, errlen, "unsupported ESSIV hash '%s'",
                ivhash ? ivhash : "(none)");
      goto fail;
    }
    c->essiv_ci = cipher_lookup (alg, h->digest_size);
    if (c->essiv_ci == NULL || c->essiv_ci->block_size != c->bs) {
      c->essiv_ci = NULL;
      snprintf (err, errlen, "ESSIV with %s needs a %s cipher with a "
                "%u-bit key, which does not exist", ivhash, alg,
                h->digest_size * 8);
      goto fail;
    }
    q2_hash_buf (h, key, keylen, NULL, 0, hk);
    c->essiv = keyed (c->essiv_ci, true, hk);
    explicit_bzero (hk, sizeof hk);
    if (c->essiv == NULL) {
      snprintf (err, errlen, "malloc: %s", strerror (ENOMEM));
      goto fail;
    }
  }
  *out = c;
  return 0;

 fail:
  if (c->ci)
    q2_crypto_free (c);
  else
    free (c);
  errno = EINVAL;
  return -1;
}

static void
make_iv (const struct q2_crypto *c, uint64_t sector, uint8_t *iv)
{
  uint8_t tmp[16];

  memset (iv, 0, c->bs);
  switch (c->iv) {
  case IV_NONE:
    break;
  case IV_PLAIN:
    sector &= 0xffffffff;
    /* fallthrough */
  case IV_PLAIN64:
    sector = htole64 (sector);
    memcpy (iv, &sector, c->iv == IV_PLAIN ? 4 : 8);
    break;
  case IV_ESSIV:
    memset (tmp, 0, sizeof tmp);
    sector = htole64 (sector);
    memcpy (tmp, &sector, 8);
    c->essiv_ci->encrypt (c->essiv, c->bs, iv, tmp);
    break;
  }
}

void
q2_crypto_encrypt (const struct q2_crypto *c, uint64_t sector, uint8_t *dst,
                   const uint8_t *src, size_t len)
{
  uint8_t iv[16];

  if (c->mode == M_ECB) {
    c->ci->encrypt (c->enc, len, dst, src);
    return;
  }
  for (; len >= Q2_SECTOR; len -= Q2_SECTOR, sector++,
         dst += Q2_SECTOR, src += Q2_SECTOR) {
    make_iv (c, sector, iv);
    switch (c->mode) {
    case M_XTS:
      xts_encrypt_message (c->enc, c->twk, c->ci->encrypt, iv, Q2_SECTOR,
                           dst, src);
      break;
    case M_CBC:
      cbc_encrypt (c->enc, c->ci->encrypt, c->bs, iv, Q2_SECTOR, dst, src);
      break;
    case M_CTR:
      ctr_crypt (c->enc, c->ci->encrypt, c->bs, iv, Q2_SECTOR, dst, src);
      break;
    case M_ECB:
      break;
    }
  }
}

void
q2_crypto_decrypt (const struct q2_crypto *c, uint64_t sector, uint8_t *dst,
                   const uint8_t *src, size_t len)
{
  uint8_t iv[16];

  if (c->mode == M_ECB) {
    c->ci->decrypt (c->dec, len, dst, src);
    return;
  }
  for (; len >= Q2_SECTOR; len -= Q2_SECTOR, sector++,
         dst += Q2_SECTOR, src += Q2_SECTOR) {
    make_iv (c, sector, iv);
    switch (c->mode) {
    case M_XTS:
      xts_decrypt_message (c->dec, c->twk, c->ci->decrypt, c->ci->encrypt,
                           iv, Q2_SECTOR, dst, src);
      break;
    case M_CBC:
      cbc_decrypt (c->dec, c->ci->decrypt, c->bs, iv, Q2_SECTOR, dst, src);
      break;
    case M_CTR:
      ctr_crypt (c->enc, c->ci->encrypt, c->bs, iv, Q2_SECTOR, dst, src);
      break;
    case M_ECB:
      break;
    }
  }
}
