/* nbdkit-qcow2: a small, locked, write-back cache of table slices.
 * SPDX-License-Identifier: BSD-3-Clause
 *
 * One generic cache serves L2 tables and refcount blocks alike: both are
 * clusters of the image file, cut into fixed-size slices and keyed by
 * file offset.  Callers copy entries in and out under the cache's own
 * lock, so no pointer into the cache ever escapes.
 */

#ifndef QCOW2_CACHE_H
#define QCOW2_CACHE_H

#include <stddef.h>
#include <stdint.h>

struct q2_io;
struct q2_cache;

/* nslices is raised to a small minimum so that concurrent loads can't
 * starve each other.
 */
extern struct q2_cache *q2_cache_new (struct q2_io *io, const char *what,
                                      size_t slice_size, size_t nslices);
extern void q2_cache_free (struct q2_cache *c);
extern size_t q2_cache_slice_size (const struct q2_cache *c);

/* Copy [off, off+n) of the file, which must lie in one slice, through
 * the cache.
 */
extern int q2_cache_read (struct q2_cache *c, uint64_t off, void *buf,
                          size_t n);
/* Update [off, off+n) in the cache and mark the slice dirty.  It reaches
 * the file on flush or eviction, after every dependency has.
 */
extern int q2_cache_write (struct q2_cache *c, uint64_t off, const void *buf,
                           size_t n);
/* Write back every dirty slice (dependencies first, then a barrier). */
extern int q2_cache_flush (struct q2_cache *c);
/* Before c writes anything back, dep must be written back and flushed. */
extern void q2_cache_set_dependency (struct q2_cache *c, struct q2_cache *dep);
/* Before c writes anything back, io must be flushed (data the new
 * entries point at must be stable first).
 */
extern void q2_cache_set_barrier (struct q2_cache *c, struct q2_io *io);
/* Forget the slices of [off, off+len) without writing them back. */
extern void q2_cache_discard (struct q2_cache *c, uint64_t off, uint64_t len);
extern void q2_cache_stats (struct q2_cache *c, uint64_t *hits,
                            uint64_t *misses, uint64_t *writebacks);

#endif /* QCOW2_CACHE_H */
