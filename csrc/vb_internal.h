/*
 * Helpers shared by the C files of the native core; not part of the cffi
 * interface (build_native.py only reads vb.h).
 */
#ifndef VB_INTERNAL_H
#define VB_INTERNAL_H

#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "vb.h"

/* The balloon and the discard engine work in 4 KiB pages whatever the host
 * page size: virtio 1.x 5.5.6 "the page size is 4096 bytes" for PFNs
 * (VIRTIO_BALLOON_PFN_SHIFT in linux/include/uapi/linux/virtio_balloon.h). */
#define VB_PAGE_SHIFT 12
#define VB_PAGE_SIZE ((uint64_t)1 << VB_PAGE_SHIFT)
#define VB_MAX_REGIONS 32

/* Values of vb_region.discard_method. */
#define VB_DISCARD_UNTRIED 0
#define VB_DISCARD_FALLOCATE 1
#define VB_DISCARD_MADVISE 2

__attribute__((format(printf, 3, 4)))
static inline void vb_seterr(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || errlen == 0) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Adds 1 to an eventfd (-1: none).  EAGAIN (counter saturated) is fine:
 * the reader has a wakeup pending anyway. */
static inline void vb_eventfd_signal(int fd)
{
    uint64_t one = 1;

    if (fd >= 0 && write(fd, &one, sizeof(one)) < 0) {
        /* EAGAIN */
    }
}

/* Resets a non-blocking eventfd (EAGAIN: nothing was pending). */
static inline void vb_eventfd_drain(int fd)
{
    uint64_t value;

    if (read(fd, &value, sizeof(value)) < 0) {
        /* EAGAIN */
    }
}

/* Starts fn(arg) on a thread named name (as top -H shows it); 0, or -1 with
 * the reason in err ("cannot start <what> thread: ..."). */
static inline int vb_thread_start(pthread_t *thread, void *(*fn)(void *), void *arg, const char *name,
                                  const char *what, char *err, size_t errlen)
{
    int rc = pthread_create(thread, NULL, fn, arg);

    if (rc != 0) {
        vb_seterr(err, errlen, "cannot start %s thread: %s", what, strerror(rc));
        return -1;
    }
    pthread_setname_np(*thread, name);
    return 0;
}

/* Index of the region holding guest-physical address gpa, or -1.  Regions
 * are kept sorted by gpa (vb_mem_add inserts in order), so this is a binary
 * search. */
int vb_mem_find_gpa(const vb_mem *mem, uint64_t gpa);

/* Sorts n PFNs ascending (radix sort; discard.c). */
void vb_sort_u32(uint32_t *a, uint32_t n);

/* Frees a region's huge page tracking arrays and resets it to "no huge
 * pages" (granule 4 KiB); track.c. */
void vb_track_release(vb_region *r);

#endif
