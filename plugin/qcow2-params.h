/* nbdkit-qcow2: parameters shared by the plugin and the filter.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * The plugin passes its keys as they are; the filter strips its
 * "qcow2-" prefix first.  A new parameter is added here once and both
 * front ends get it.
 */

#ifndef QCOW2_PARAMS_H
#define QCOW2_PARAMS_H

#include "qcow2.h"
#include "qcow2-create.h"

struct q2_params {
  char *backing;
  char *data_file;
  char *snapshot;
  char *password;               /* wiped before it is freed */
  char *backing_password;
  struct q2_open_opts opts;     /* points into the fields above */
  /* snapshot-create=, snapshot-apply=, snapshot-delete=, in order. */
  struct q2_snapshot_op *snapshot_ops;  /* args are ours to free */
  size_t n_snapshot_ops;
  /* create=true and its options (qcow2-create.h).  backing=,
   * backing-format= and data-file= are what the new image records.
   */
  bool create;
  const char *create_only_key;  /* a creation-only key seen, for errors */
  struct q2_create_opts create_opts;
  struct {                      /* encrypt-format=luks options */
    const char *cipher_alg, *cipher_mode, *ivgen_alg, *ivgen_hash_alg,
      *hash_alg;
    uint64_t iter_time_ms;
  } luks;
};

extern struct q2_params q2_params;

/* Returns 0 if key was handled, -1 on error (reported), and 1 if the
 * key is not one of the shared parameters.
 */
extern int q2_params_config (const char *key, const char *value);
/* Validate and fill in opts once every key has been seen. */
extern int q2_params_complete (void);
extern void q2_params_free (void);
/* Run the snapshot operations asked for, in command-line order, on the
 * image just opened (from .get_ready, before any client).  Fails if
 * nbdkit was started read-only (-r), before touching the file.
 */
extern int q2_params_snapshot_ops (struct q2_image *img);
/* Whether nbdkit's command line has -r (nbdkit 1.32 offers no call);
 * in qcow2-readonly.c.
 */
extern bool q2_params_nbdkit_readonly (void);

/* create=true: the absolute path of a file that need not exist yet
 * (its directory must), for config_complete; NULL after an error.
 */
extern char *q2_params_create_path (const char *file);
/* create=true: create the image at filename (from get_ready, before
 * it is opened).
 */
extern int q2_params_create (const char *filename);

/* Help text for the shared parameters (prefix "" or "qcow2-"). */
#define Q2_PARAMS_HELP(p) \
  p "backing=<PATH>|none   Override the backing file named in the image.\n" \
  p "backing=<NBD-URI>     Backing file on an NBD server (nbd://, nbd+unix://...).\n" \
  p "allow-remote-backing=true  Follow NBD backing names found in images.\n" \
  p "backing-format=raw|qcow2  Format of the backing file (never probed).\n" \
  p "data-file=<PATH>      Override the external data file.\n" \
  p "snapshot=<ID|NAME>    Export an internal snapshot, read-only.\n" \
  p "l2-cache-size=<SIZE>  L2 metadata cache budget (default 32M).\n" \
  p "password=<PASSWORD>|-|+FILE|-FD  Secret of an encrypted image.\n" \
  p "backing-password=...  Secret of encrypted backing files (default: password).\n" \
  p "compress=true         Store every write as compressed clusters.\n" \
  p "snapshot-create=<NAME>  Take an internal snapshot at startup.\n" \
  p "snapshot-apply=<ID|NAME>  Revert to an internal snapshot at startup.\n" \
  p "snapshot-delete=<ID|NAME>  Delete an internal snapshot at startup.\n" \
  p "repair=auto|all|off|check  Refcount repair (default auto: rebuild dirty images).\n" \
  p "create=true           Create the image (it must not exist), then serve it.\n" \
  p "size=<SIZE>           create: virtual size (default: the backing file's).\n" \
  p "cluster-size=<SIZE>   create: 512 to 2M, a power of 2 (default 64K).\n" \
  p "compat=0.10|1.1       create: qcow2 version 2 or 3 (default 1.1).\n" \
  p "refcount-bits=<N>     create: 1, 2, 4, ... 64 (default 16).\n" \
  p "extended-l2=true|false  create: subcluster allocation (16K clusters up).\n" \
  p "compression-type=zlib|zstd  create: for compressed clusters.\n" \
  p "lazy-refcounts=true|false   create: set the lazy refcounts bit.\n" \
  p "preallocation=off|metadata|falloc|full  create: what to allocate.\n" \
  p "data-file-raw=true|false    create: the data file is a raw image.\n" \
  p "encrypt-format=luks|aes     create: encrypt with password=.\n" \
  p "encrypt-cipher-alg=, encrypt-cipher-mode=, encrypt-ivgen-alg=,\n" \
  p "encrypt-ivgen-hash-alg=, encrypt-hash-alg=, encrypt-iter-time=<MS>\n" \
  p "                      create: LUKS parameters, as qemu-img's."


#endif /* QCOW2_PARAMS_H */
