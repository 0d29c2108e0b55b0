/* nbdkit-qcow2: sector ciphers, hashes and PBKDF2 over nettle.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * A low-level layer with no knowledge of images: a keyed cipher that
 * encrypts and decrypts runs of 512-byte sectors given the number of
 * the first sector.  A keyed object is read-only after creation, so
 * every thread may use it at once (IVs live on the caller's stack).
 */

#ifndef QCOW2_CRYPTO_H
#define QCOW2_CRYPTO_H

#include <stddef.h>
#include <stdint.h>

#define Q2_SECTOR 512
#define Q2_MAX_KEY 64           /* bytes, e.g. aes-256-xts */
#define Q2_MAX_DIGEST 64        /* sha512 */

struct q2_crypto;
struct nettle_hash;

/* Hash by LUKS name (sha1, sha224, sha256, sha384, sha512, ripemd160),
 * or NULL.
 */
extern const struct nettle_hash *q2_hash_lookup (const char *name);
extern unsigned q2_hash_size (const struct nettle_hash *h);
extern void q2_hash_buf (const struct nettle_hash *h, const void *a,
                         size_t alen, const void *b, size_t blen,
                         uint8_t *digest);

/* PBKDF2-HMAC-hash. */
extern void q2_pbkdf2 (const struct nettle_hash *h, const void *pw,
                       size_t pwlen, const uint8_t *salt, size_t saltlen,
                       unsigned iterations, uint8_t *out, size_t outlen);

/* Does this build know cipher alg ("aes", "twofish", "serpent",
 * "cast5") with a key of keylen bytes (per cipher, not XTS's pair)?
 */
extern int q2_cipher_known (const char *alg, size_t keylen);

/* Make a keyed sector cipher.  mode: "xts", "cbc", "ecb", "ctr";
 * ivgen: "plain", "plain64", "essiv" (ivhash names its hash) or NULL
 * (ecb only).  keylen counts both halves for XTS.  On failure returns
 * -1 and writes a message into err (which names the combination).
 */
extern int q2_crypto_new (const char *alg, const char *mode,
                          const char *ivgen, const char *ivhash,
                          const uint8_t *key, size_t keylen,
                          struct q2_crypto **out, char *err, size_t errlen);
extern void q2_crypto_free (struct q2_crypto *c);

/* len is a multiple of Q2_SECTOR; sector numbers the first sector.
 * dst may equal src.
 */
extern void q2_crypto_encrypt (const struct q2_crypto *c, uint64_t sector,
                               uint8_t *dst, const uint8_t *src, size_t len);
extern void q2_crypto_decrypt (const struct q2_crypto *c, uint64_t sector,
                               uint8_t *dst, const uint8_t *src, size_t len);

/* For --dump-plugin. */
#define Q2_CRYPTO_CIPHERS "aes-128,aes-192,aes-256,twofish-128,twofish-192," \
  "twofish-256,serpent-128,serpent-192,serpent-256,cast5-128"
#define Q2_CRYPTO_MODES "xts,cbc,ecb,ctr"
#define Q2_CRYPTO_IVGENS "plain,plain64,essiv"
#define Q2_CRYPTO_HASHES "sha1,sha224,sha256,sha384,sha512,ripemd160"

#endif /* QCOW2_CRYPTO_H */
