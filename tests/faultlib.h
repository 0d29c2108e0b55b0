/* nbdkit-qcow2 tests: shared pieces of the fault-injection and
 * power-loss tests: a seeded workload, a model of the guest disk, and
 * helpers that run qemu-img.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * The expected guest content always comes from the model (or from the
 * raw file qemu-img converted the starting image from), never from the
 * layer under test.
 */

#ifndef FAULTLIB_H
#define FAULTLIB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KiB (UINT64_C (1) << 10)
#define MiB (UINT64_C (1) << 20)

/* ---- random numbers (splitmix64) ---- */
extern uint64_t fl_rand (uint64_t *state);
extern uint64_t fl_below (uint64_t *state, uint64_t n);  /* [0, n) */
/* Fill buf with bytes derived from seed. */
extern void fl_fill (uint8_t *buf, uint64_t len, uint64_t seed);

/* ---- workload ---- */
enum fl_kind { FL_WRITE, FL_ZERO, FL_ZERO_TRIM, FL_TRIM, FL_FLUSH, FL_READ };

struct fl_op {
  enum fl_kind kind;
  uint64_t off, len, seed;
};

struct fl_workload {
  struct fl_op *ops;
  size_t n;
};

/* nops operations on a disk of size bytes; the last is always a flush.
 * Writes have random sizes and offsets: unaligned, sector-aligned and
 * cluster-aligned, small and cluster-crossing.
 */
extern void fl_workload_gen (struct fl_workload *w, uint64_t seed,
                             uint64_t size, uint64_t cluster, size_t nops);
extern void fl_workload_free (struct fl_workload *w);
extern const char *fl_kind_name (enum fl_kind k);

/* ---- model of the guest disk ----
 * Each byte is known exactly, or is one of two values (a request failed
 * part way), or is anything (trimmed, or hit by several failures).
 * Bytes changed since the last successful flush are remembered, so the
 * durable part of the model can be checked on its own.
 */
enum { FL_EXACT, FL_EITHER, FL_ANY };

struct fl_model {
  uint64_t size;
  uint8_t *val, *alt, *st;
  uint8_t *touched;             /* changed since the last good flush */
  struct { uint64_t off, len; } *tr;
  size_t ntr, captr;
};

extern void fl_model_init (struct fl_model *m, uint64_t size,
                           const uint8_t *initial /* NULL: zeros */);
/* Back to the starting content, reusing the memory. */
extern void fl_model_reset (struct fl_model *m, const uint8_t *initial);
extern void fl_model_free (struct fl_model *m);
/* The request op completed (ok) or failed (!ok).  data: a write's data. */
extern void fl_model_apply (struct fl_model *m, const struct fl_op *op,
                            const uint8_t *data, bool ok);
/* Mark op's range as changed without changing what is expected. */
extern void fl_model_touch (struct fl_model *m, uint64_t off, uint64_t len);
extern void fl_model_flushed (struct fl_model *m);
/* Compare actual[off, off+len) with the model.  skip_touched: ignore
 * bytes changed since the last good flush.  Prints the first few
 * mismatches (prefixed by what) and returns their number; *compared
 * counts the bytes that had to match exactly.
 */
extern uint64_t fl_model_check (const struct fl_model *m,
                                const uint8_t *actual, uint64_t off,
                                uint64_t len, bool skip_touched,
                                uint64_t *compared, const char *what);
/* The offset of some byte the model knows exactly, chosen from seed,
 * or UINT64_MAX if there is none (for the self-tests).
 */
extern uint64_t fl_model_known_byte (const struct fl_model *m, uint64_t seed);

/* ---- processes and files ---- */
/* Run argv with stdout and stderr to logfile (or /dev/null); returns
 * the exit status, or -1 if it did not exit normally.
 */
extern int fl_run (char *const argv[], const char *logfile);
/* qemu-img check; the report goes to logfile.  Returns the exit code. */
extern int fl_qemu_check (const char *image, const char *logfile);
/* qemu-img convert (of snapshot, unless NULL) to raw, then read the
 * raw file into buf (size bytes).  Returns 0 or -1.
 */
extern int fl_qemu_read_all (const char *image, const char *snapshot,
                             const char *rawpath, uint8_t *buf,
                             uint64_t size);
/* Make a qcow2 image at path (qemu-img convert -o create_opts, -c if
 * compress) from seeded raw content, which goes to initial (size
 * bytes): about half of the first half holds data, and all of the
 * first dense bytes.  The image file's bytes go to *file.
 */
extern int fl_make_image (const char *path, const char *create_opts,
                          bool compress, uint64_t size, uint64_t dense,
                          uint64_t seed, uint8_t *initial, uint8_t **file,
                          size_t *file_len);
/* The same with the dense part sized so that the file can grow only
 * about slack bytes before its refcount table must grow.
 */
extern int fl_make_image_near_full (const char *path,
                                    const char *create_opts, uint64_t size,
                                    uint64_t slack, uint64_t seed,
                                    uint8_t *initial, uint8_t **file,
                                    size_t *file_len);
/* Add an internal snapshot to the image at path; *file is reread. */
extern int fl_snapshot_create (const char *path, const char *name,
                               uint8_t **file, size_t *file_len);
/* The same, made by the layer (q2_snapshot_create) instead of qemu-img. */
extern int fl_layer_snapshot_create (const char *path, const char *name,
                                     uint8_t **file, size_t *file_len);
extern int fl_write_file (const char *path, const void *data, size_t len);
extern int fl_read_file (const char *path, uint8_t **data, size_t *len);
extern void fl_print_file (const char *path, int max_lines);
extern void fl_rm_rf (const char *dir);

#endif /* FAULTLIB_H */
