/*
 * Ranges of guest addresses: made from PFN arrays, sorted and merged.
 * The PFN32 sink (vring.c) coalesces as it reads; these are the same rules
 * for arrays already in our memory, and the merge the tracker uses on what
 * it hands out.  Uses mem.c only.
 */
#define _GNU_SOURCE
#include <stdlib.h>

#include "vb_internal.h"

void vb_ranges_run_bounds(const vb_mem *mem, uint64_t pfn, uint64_t *low, uint64_t *high)
{
    uint64_t gpa = pfn << VB_PAGE_SHIFT;
    int i;

    *low = 0;
    *high = UINT64_MAX;
    if (mem == NULL) {
        return;
    }
    i = vb_mem_find_gpa(mem, gpa);
    if (i >= 0) {
        *low = mem->regions[i].gpa >> VB_PAGE_SHIFT;
        *high = (mem->regions[i].gpa + mem->regions[i].size) >> VB_PAGE_SHIFT;
        return;
    }
    for (uint32_t k = 0; k < mem->nregions; k++) {   /* sorted by gpa: the gap around gpa */
        if (mem->regions[k].gpa > gpa) {
            *high = mem->regions[k].gpa >> VB_PAGE_SHIFT;
            return;
        }
        *low = (mem->regions[k].gpa + mem->regions[k].size) >> VB_PAGE_SHIFT;
    }
}

int vb_ranges_extend(vb_range *open, uint64_t pfn, uint64_t low, uint64_t high)
{
    uint64_t start = open->gpa >> VB_PAGE_SHIFT, end = start + (open->len >> VB_PAGE_SHIFT);

    if (pfn == end && end < high) {
        open->len += VB_PAGE_SIZE;
        return 1;
    }
    if (pfn + 1 == start && pfn >= low) {
        open->gpa -= VB_PAGE_SIZE;
        open->len += VB_PAGE_SIZE;
        return 1;
    }
    return 0;
}

uint32_t vb_ranges_from_pfns(const vb_mem *mem, const uint32_t *pfns, uint32_t n, vb_range *out)
{
    uint32_t nr = 0;
    uint64_t low = 0, high = 0;   /* where the open range may grow: one region, or one gap */

    for (uint32_t k = 0; k < n; k++) {
        uint64_t pfn = pfns[k];

        if (nr > 0 && vb_ranges_extend(&out[nr - 1], pfn, low, high)) {
            continue;
        }
        out[nr++] = (vb_range){pfn << VB_PAGE_SHIFT, VB_PAGE_SIZE};
        vb_ranges_run_bounds(mem, pfn, &low, &high);
    }
    return nr;
}

static int cmp_range(const void *a, const void *b)
{
    uint64_t x = ((const vb_range *)a)->gpa, y = ((const vb_range *)b)->gpa;

    return (x > y) - (x < y);
}

uint32_t vb_ranges_merge(const vb_mem *mem, vb_range *ranges, uint32_t n)
{
    uint32_t out = 0;
    int last_region = -2;

    if (n < 2) {
        return n;
    }
    qsort(ranges, n, sizeof(vb_range), cmp_range);
    for (uint32_t i = 0; i < n; i++) {
        int region = vb_mem_find_gpa(mem, ranges[i].gpa);
        uint64_t last_end = out > 0 ? ranges[out - 1].gpa + ranges[out - 1].len : 0;

        /* Neighbouring regions are different files, or other offsets of
         * one: a range never crosses from one into the next. */
        if (out > 0 && region == last_region && ranges[i].gpa <= last_end) {
            uint64_t end = ranges[i].gpa + ranges[i].len;

            if (end > last_end) {
                ranges[out - 1].len = end - ranges[out - 1].gpa;
            }
        } else {
            ranges[out++] = ranges[i];
            last_region = region;
        }
    }
    return out;
}
