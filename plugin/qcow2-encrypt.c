/* nbdkit-qcow2: encrypted images (legacy AES and LUKS).
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * Keys the image's sector cipher at open, from password= (the top
 * image) or backing-password= (falling back to password=) further down
 * the chain.  Guest data is encrypted per 512-byte sector; metadata
 * never is.  Legacy AES (crypt_method 1) numbers sectors by guest
 * offset, LUKS (crypt_method 2) by host offset.
 */

#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"
#include "qcow2-crypto.h"
#include "qcow2-luks.h"

/* Legacy AES: the key is the password truncated or zero-padded to 16
 * bytes; AES-128-CBC with the plain64 IV of the guest sector.
 */
static int
open_aes (struct q2_image *img, const char *password)
{
  uint8_t key[16] = { 0 };
  size_t n = strlen (password);
  char err[200];
  int r;

  memcpy (key, password, n < sizeof key ? n : sizeof key);
  r = q2_crypto_new ("aes", "cbc", "plain64", NULL, key, sizeof key,
                     &img->crypt, err, sizeof err);
  explicit_bzero (key, sizeof key);
  if (r == -1)
    return Q2_FAIL (EINVAL, "%s: AES: %s", img->filename, err);
  img->crypt_host_iv = false;
  return 0;
}

static int
check_luks_area (struct q2_image *img)
{
  const struct q2_header *h = &img->h;
  uint64_t off = h->crypto_offset, len = h->crypto_length;

  if (off == 0 && len == 0)
    return Q2_FAIL (EINVAL, "%s: LUKS-encrypted image (crypt_method 2) "
                    "without a full-disk-encryption header extension",
                    img->filename);
  if (off % img->cluster_size || off == 0 || len == 0 ||
      len > Q2_MAX_LUKS_AREA || off > img->file_size ||
      len > img->file_size - off)
    return Q2_FAIL (EINVAL, "%s: full-disk-encryption header extension: "
                    "area at 0x%" PRIx64 " of %" PRIu64 " bytes is "
                    "misaligned, too large or outside the file",
                    img->filename, off, len);
  if ((h->l1_size && off < h->l1_offset + (uint64_t) h->l1_size * 8 &&
       h->l1_offset < off + len) ||
      (off < h->reftable_offset + (uint64_t) h->reftable_clusters *
       img->cluster_size && h->reftable_offset < off + len))
    return Q2_FAIL (EINVAL, "%s: the LUKS area at 0x%" PRIx64 " overlaps "
                    "the L1 or refcount table", img->filename, off);
  return 0;
}

int
q2_crypt_open (struct q2_image *img, const struct q2_open_opts *opts,
               unsigned depth)
{
  const char *pw = opts->password;
  int r;

  if (img->h.crypt_method == QCOW2_CRYPT_NONE)
    return 0;
  if (depth > 0 && opts->backing_password)
    pw = opts->backing_password;
  if (pw == NULL)
    return Q2_FAIL (EINVAL, "%s: the image is encrypted (%s); give the "
                    "password with password=%s", img->filename,
                    img->h.crypt_method == QCOW2_CRYPT_AES ? "legacy AES"
                    : "LUKS",
                    depth > 0 ? " or backing-password=" : "");
  if (img->size % Q2_SECTOR)
    return Q2_FAIL (EINVAL, "%s: encrypted image with a virtual size (%"
                    PRIu64 ") that is not a multiple of 512",
                    img->filename, img->size);
  if (img->h.crypt_method == QCOW2_CRYPT_AES)
    return open_aes (img, pw);
  if (check_luks_area (img) == -1)
    return -1;
  r = q2_luks_open (img->filename, img->io, img->h.crypto_offset,
                    img->h.crypto_length, pw, &img->crypt);
  img->crypt_host_iv = true;
  return r;
}

void
q2_crypt_close (struct q2_image *img)
{
  q2_crypto_free (img->crypt);
  img->crypt = NULL;
}

void
q2_crypt_decrypt (struct q2_image *img, uint8_t *buf, uint64_t len,
                  uint64_t host, uint64_t guest)
{
  q2_crypto_decrypt (img->crypt,
                     (img->crypt_host_iv ? host : guest) / Q2_SECTOR,
                     buf, buf, len);
}

void
q2_crypt_encrypt (struct q2_image *img, uint8_t *dst, const uint8_t *src,
                  uint64_t len, uint64_t host, uint64_t guest)
{
  q2_crypto_encrypt (img->crypt,
                     (img->crypt_host_iv ? host : guest) / Q2_SECTOR,
                     dst, src, len);
}
