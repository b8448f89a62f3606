/*
 * Helpers shared by the C files of the core; not part of the cffi
 * interface.  The runtime's own helpers are in vb_runtime_internal.h.
 */
#ifndef VB_INTERNAL_H
#define VB_INTERNAL_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "vb_core.h"

/* The balloon and the discard engine work in 4 KiB pages whatever the host
 * page size: VB_PAGE_SHIFT comes from vhostballoon/device/queues.py
 * (PFN_SHIFT) through vb_gen.h. */
#define VB_PAGE_SIZE ((uint64_t)1 << VB_PAGE_SHIFT)

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

/* Index of the region holding guest-physical address gpa, or -1.  Regions
 * are kept sorted by gpa (vb_mem_add inserts in order), so this is a binary
 * search (mem.c). */
int vb_mem_find_gpa(const vb_mem *mem, uint64_t gpa);

/* Where a run of consecutive pages starting at pfn may grow: [low, high),
 * its region, or the gap between regions it lies in; ranges.c. */
void vb_ranges_run_bounds(const vb_mem *mem, uint64_t pfn, uint64_t *low, uint64_t *high);
/* Grows the open range by pfn when it is the page just above or just below
 * it, within [low, high): 1, else 0.  Consecutive pages coalesce whether
 * the guest lists them ascending or descending (Linux hands its pages over
 * in descending runs). */
int vb_ranges_extend(vb_range *open, uint64_t pfn, uint64_t low, uint64_t high);

/* Frees a region's huge page tracking arrays and resets it to "no huge
 * pages" (granule 4 KiB).  In mem.c, which owns every array of a region;
 * track.c calls it when it reconfigures one. */
void vb_region_drop_tracking(vb_region *r);

#endif
