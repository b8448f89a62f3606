/*
 * Huge page tracking: frees ballooned guest memory in whole huge pages,
 * whatever order the guest's 4 KiB pages arrive in.
 *
 * The guest balloons 4 KiB pages in effectively random order, 256 per
 * buffer.  Punching a 4 KiB hole into a transparent huge page splits it (and
 * costs a syscall per page); on hugetlbfs it frees nothing at all (the
 * kernel only zeroes a partial huge page).  So per region we count, per
 * huge page, how many of its pages are ballooned; a huge page whose pages
 * are all ballooned is handed out as one range, and the others wait as
 * "pending" until a policy decides to free them anyway (or the guest takes
 * them back).  QEMU remembers one partially ballooned huge page and forgets
 * it as soon as a page of another one arrives; this keeps them all.
 *
 * Huge pages are aligned by file offset: the kernel allocates them by page
 * cache index, so region page p lies in huge page
 * (mmap_offset / 4096 + p) / pages_per_huge_page.  A huge page only partly
 * inside the region is never whole here, because its other part belongs to
 * another region or to no region at all.
 *
 * State per region (vb_region): `tracked` is the tracker's own copy of the
 * ballooned bitmap (so a repeated or bogus PFN cannot make a count lie),
 * `pending` the ballooned pages not handed out yet, `huge_ballooned` and
 * `huge_pending` per huge page counts of those two bitmaps.
 *
 * Works on ranges of guest addresses: a range that covers a whole huge page
 * none of whose pages were counted frees it as it is, a word of the bitmaps
 * at a time; the other pages go one by one.
 *
 * Runs under the server's memory lock, like vb_balloon_update; see
 * vb_core.h for the threading rule.  Uses mem.c and ranges.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "vb_internal.h"

/* 1 GiB huge pages are the largest x86 and arm64 have; a per huge page
 * count of 4 KiB pages then still fits in 32 bits with room to spare. */
#define VB_GRANULE_MAX ((uint64_t)1 << 30)

static uint64_t monotonic_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- bitmaps and geometry ------------------------------------------------ */

static inline int bit_test(const uint64_t *bm, uint64_t i)
{
    return (bm[i / 64] >> (i % 64)) & 1;
}

static inline void bit_set(uint64_t *bm, uint64_t i)
{
    bm[i / 64] |= (uint64_t)1 << (i % 64);
}

static inline void bit_clear(uint64_t *bm, uint64_t i)
{
    bm[i / 64] &= ~((uint64_t)1 << (i % 64));
}

/* First set bit of bm at or after i and before end; end if none. */
static uint64_t next_set(const uint64_t *bm, uint64_t i, uint64_t end)
{
    while (i < end) {
        uint64_t w = bm[i / 64] >> (i % 64);

        if (w != 0) {
            i += (uint64_t)__builtin_ctzll(w);
            return i < end ? i : end;
        }
        i = (i / 64 + 1) * 64;
    }
    return end;
}

static inline uint64_t pages_per_huge(const vb_region *r)
{
    return r->granule >> VB_PAGE_SHIFT;
}

/* Huge page (index into the per huge page arrays) holding region page p. */
static inline uint64_t huge_of(const vb_region *r, uint64_t p)
{
    return ((r->mmap_offset >> VB_PAGE_SHIFT) + p) / pages_per_huge(r) - r->huge_first;
}

/* Region pages [*first, *end) of huge page h; returns whether h lies
 * wholly inside the region. */
static int huge_span(const vb_region *r, uint64_t h, uint64_t *first, uint64_t *end)
{
    uint64_t ppg = pages_per_huge(r);
    uint64_t off_pages = r->mmap_offset >> VB_PAGE_SHIFT;
    uint64_t npages = r->size >> VB_PAGE_SHIFT;
    uint64_t start = (r->huge_first + h) * ppg;     /* file page */
    int whole = start >= off_pages && start + ppg <= off_pages + npages;

    *first = start > off_pages ? start - off_pages : 0;
    *end = start + ppg - off_pages < npages ? start + ppg - off_pages : npages;
    return whole;
}

static void pending_drop(vb_region *r, uint64_t p, uint64_t h)
{
    bit_clear(r->pending, p);
    r->huge_pending[h]--;
    if (--r->pending_pages == 0) {
        r->pending_since_ns = 0;
    }
}

static void pending_add(vb_region *r, uint64_t p, uint64_t h, uint64_t *now)
{
    bit_set(r->pending, p);
    r->huge_pending[h]++;
    if (r->pending_pages++ == 0) {
        if (*now == 0) {
            *now = monotonic_ns();
        }
        r->pending_since_ns = *now;
    }
}

/* The tracker counts huge page h as wholly ballooned: check that against
 * the ballooned bitmap before anything is freed.  They can only disagree
 * when the caller skipped a vb_track_deflate; then the pages the guest took
 * back are uncounted here and the huge page is not whole after all. */
static int confirm_whole(vb_region *r, uint64_t h, uint64_t first, uint64_t end)
{
    int whole = 1;
    uint64_t diff = 0;

    for (uint64_t w = first / 64; w <= (end - 1) / 64; w++) {
        uint64_t mask = ~(uint64_t)0;

        if (w == first / 64) {
            mask &= ~(uint64_t)0 << (first % 64);
        }
        if (w == (end - 1) / 64 && end % 64 != 0) {
            mask &= ~(uint64_t)0 >> (64 - end % 64);
        }
        diff |= r->tracked[w] & ~r->ballooned[w] & mask;
    }
    if (diff == 0) {
        return 1;       /* the usual case, a word at a time */
    }
    for (uint64_t p = first; p < end; p++) {
        if (!bit_test(r->ballooned, p) && bit_test(r->tracked, p)) {
            bit_clear(r->tracked, p);
            r->huge_ballooned[h]--;
            if (bit_test(r->pending, p)) {
                pending_drop(r, p, h);
            }
            whole = 0;
        }
    }
    return whole;
}

/* ---- configuration ------------------------------------------------------- */

int vb_track_configure(vb_mem *mem, uint32_t region, uint64_t granule, int backing, int thp,
                       char *err, size_t errlen)
{
    vb_region *r;
    uint64_t npages, words, huge_end, nhuge;
    uint32_t *huge_ballooned, *huge_pending;
    uint64_t *tracked, *pending, *huge_cut;

    if (region >= mem->nregions) {
        vb_seterr(err, errlen, "region %" PRIu32 " out of range (table has %" PRIu32 " regions)",
                  region, mem->nregions);
        return -1;
    }
    r = &mem->regions[region];
    if (granule < VB_PAGE_SIZE || granule > VB_GRANULE_MAX || (granule & (granule - 1)) != 0) {
        vb_seterr(err, errlen,
                  "region %" PRIu32 ": huge page size %" PRIu64 " is not a power of two"
                  " from 4096 to %" PRIu64, region, granule, VB_GRANULE_MAX);
        return -1;
    }
    if (backing < VB_BACKING_FILE || backing > VB_BACKING_HUGETLBFS) {
        vb_seterr(err, errlen, "region %" PRIu32 ": unknown backing kind %d", region, backing);
        return -1;
    }
    if (r->pending_pages != 0) {
        vb_seterr(err, errlen,
                  "region %" PRIu32 " has %" PRIu64 " pending pages; collect them before"
                  " changing its huge page size", region, r->pending_pages);
        return -1;
    }
    if (granule == VB_PAGE_SIZE) {
        vb_region_drop_tracking(r);
        r->backing = backing;
        r->thp = thp != 0;
        r->track_configured = 1;
        return 0;
    }

    npages = r->size >> VB_PAGE_SHIFT;
    words = (npages + 63) / 64;
    huge_end = (r->mmap_offset + r->size + granule - 1) / granule;
    nhuge = huge_end - r->mmap_offset / granule;
    huge_ballooned = calloc((size_t)nhuge, sizeof(uint32_t));
    huge_pending = calloc((size_t)nhuge, sizeof(uint32_t));
    tracked = malloc((size_t)words * sizeof(uint64_t));
    pending = calloc((size_t)words, sizeof(uint64_t));
    huge_cut = calloc((size_t)((nhuge + 63) / 64), sizeof(uint64_t));
    if (huge_ballooned == NULL || huge_pending == NULL || tracked == NULL || pending == NULL ||
        huge_cut == NULL) {
        free(huge_ballooned);
        free(huge_pending);
        free(tracked);
        free(pending);
        free(huge_cut);
        vb_seterr(err, errlen,
                  "region %" PRIu32 ": no memory to track %" PRIu64 " huge pages of %" PRIu64
                  " bytes", region, nhuge, granule);
        return -1;
    }
    vb_region_drop_tracking(r);
    r->backing = backing;
    r->thp = thp != 0;
    r->granule = granule;
    r->huge_first = r->mmap_offset / granule;
    r->nhuge = nhuge;
    r->huge_ballooned = huge_ballooned;
    r->huge_pending = huge_pending;
    r->tracked = tracked;
    r->pending = pending;
    r->huge_cut = huge_cut;
    r->track_configured = 1;

    /* Pages ballooned already were freed by whoever handled them: count
     * them, but they are not pending. */
    memcpy(tracked, r->ballooned, (size_t)words * sizeof(uint64_t));
    for (uint64_t p = next_set(tracked, 0, npages); p < npages; p = next_set(tracked, p + 1, npages)) {
        huge_ballooned[huge_of(r, p)]++;
    }
    return 0;
}

/* ---- inflate / deflate --------------------------------------------------- */

/* Bits [first, end) of bm all set / set them (whole words where possible). */
static int all_set(const uint64_t *bm, uint64_t first, uint64_t end)
{
    for (uint64_t p = first; p < end;) {
        uint64_t bit = p % 64, take = 64 - bit < end - p ? 64 - bit : end - p;
        uint64_t mask = (take == 64 ? ~(uint64_t)0 : (((uint64_t)1 << take) - 1)) << bit;

        if ((bm[p / 64] & mask) != mask) {
            return 0;
        }
        p += take;
    }
    return 1;
}

static void set_bits(uint64_t *bm, uint64_t first, uint64_t end)
{
    for (uint64_t p = first; p < end;) {
        uint64_t bit = p % 64, take = 64 - bit < end - p ? 64 - bit : end - p;

        bm[p / 64] |= (take == 64 ? ~(uint64_t)0 : (((uint64_t)1 << take) - 1)) << bit;
        p += take;
    }
}

/* Appends [gpa, +len) to out, joined to the last range when it continues
 * it (the caller keeps one region per call); 0 when out is full. */
static int put_range(vb_range *out, uint32_t *nr, uint32_t max, uint64_t gpa, uint64_t len, int *fresh)
{
    if (!*fresh && *nr > 0 && out[*nr - 1].gpa + out[*nr - 1].len == gpa) {
        out[*nr - 1].len += len;
        return 1;
    }
    if (*nr == max) {
        return 0;
    }
    out[(*nr)++] = (vb_range){gpa, len};
    *fresh = 0;
    return 1;
}

/* Pages [p0, p1) of tracked region r became ballooned: count them, hand
 * out the huge pages they complete, make the rest pending. */
static void inflate_tracked(vb_region *r, uint64_t p0, uint64_t p1, vb_range *out, uint32_t *nr,
                            uint32_t max, uint64_t *now)
{
    uint64_t ppg = pages_per_huge(r);
    int fresh = 1;   /* a new input range: do not join what another range emitted */

    while (p0 < p1) {
        uint64_t h = huge_of(r, p0), first, end, stop;
        int whole = huge_span(r, h, &first, &end);

        stop = end < p1 ? end : p1;
        /* The fast way: the range covers all of an untouched huge page. */
        if (whole && p0 == first && stop == end && r->huge_ballooned[h] == 0 &&
            all_set(r->ballooned, first, end)) {
            if (put_range(out, nr, max, r->gpa + (first << VB_PAGE_SHIFT), r->granule, &fresh)) {
                set_bits(r->tracked, first, end);
                r->huge_ballooned[h] = (uint32_t)ppg;
                p0 = end;
                continue;
            }
            /* No room: page by page, so the pages wait as pending. */
        }
        for (uint64_t p = p0; p < stop; p++) {
            if (!bit_test(r->ballooned, p) || bit_test(r->tracked, p)) {
                continue;   /* never free a page the guest did not give; counted already */
            }
            bit_set(r->tracked, p);
            r->huge_ballooned[h]++;
            if (whole && r->huge_ballooned[h] == ppg && confirm_whole(r, h, first, end) &&
                put_range(out, nr, max, r->gpa + (first << VB_PAGE_SHIFT), r->granule, &fresh)) {
                /* Whole: its pending pages go out with it, in one range. */
                for (uint64_t q = next_set(r->pending, first, end); q < end;
                     q = next_set(r->pending, q + 1, end)) {
                    pending_drop(r, q, h);
                }
            } else {
                pending_add(r, p, h, now);
            }
        }
        p0 = stop;
    }
}

/* Pages [p0, p1) of untracked region r: ballooned ones go out at once. */
static void inflate_untracked(const vb_region *r, uint64_t p0, uint64_t p1, vb_range *out, uint32_t *nr,
                              uint32_t max)
{
    int fresh = 1;

    for (uint64_t p = next_set(r->ballooned, p0, p1); p < p1;) {
        uint64_t q = p + 1;

        while (q < p1 && bit_test(r->ballooned, q)) {
            q++;
        }
        if (!put_range(out, nr, max, r->gpa + (p << VB_PAGE_SHIFT), (q - p) << VB_PAGE_SHIFT, &fresh)) {
            return;     /* cannot happen: one range per input range at most (max >= n) */
        }
        p = next_set(r->ballooned, q, p1);
    }
}

/* Walks the parts of one range that lie in a region: each call gives the
 * next one (its region and pages [*p0, *p1)), skipping what lies outside
 * guest memory; 0 when there is none left.  *at starts at the range's gpa. */
static int next_segment(vb_mem *mem, const vb_range *range, uint64_t *at, vb_region **r, uint64_t *p0,
                        uint64_t *p1)
{
    uint64_t end = range->gpa + range->len;

    if (end < range->gpa) {
        end = UINT64_MAX & ~(VB_PAGE_SIZE - 1);
    }
    while (*at < end) {
        int i = vb_mem_find_gpa(mem, *at);
        uint64_t seg_end;

        if (i < 0) {
            *at += VB_PAGE_SIZE;   /* outside guest memory: ignored */
            continue;
        }
        *r = &mem->regions[i];
        seg_end = end - (*r)->gpa > (*r)->size ? (*r)->gpa + (*r)->size : end;
        *p0 = (*at - (*r)->gpa) >> VB_PAGE_SHIFT;
        *p1 = (seg_end - (*r)->gpa + VB_PAGE_SIZE - 1) >> VB_PAGE_SHIFT;
        *at = seg_end;
        return 1;
    }
    return 0;
}

int vb_track_inflate(vb_mem *mem, const vb_range *in, uint32_t n,
                     vb_range *ranges, uint32_t max_ranges)
{
    uint32_t nr = 0, nwhole;
    uint64_t now = 0, p0, p1;
    vb_region *r;

    if (max_ranges < n) {
        return -1;
    }
    /* Huge pages first, then the pages of untracked regions, each sorted
     * and merged. */
    for (uint32_t k = 0; k < n; k++) {
        for (uint64_t at = in[k].gpa & ~(VB_PAGE_SIZE - 1); next_segment(mem, &in[k], &at, &r, &p0, &p1);) {
            if (r->tracked != NULL) {
                inflate_tracked(r, p0, p1, ranges, &nr, max_ranges, &now);
            }
        }
    }
    nwhole = nr = vb_ranges_merge(mem, ranges, nr);
    for (uint32_t k = 0; k < n; k++) {
        for (uint64_t at = in[k].gpa & ~(VB_PAGE_SIZE - 1); next_segment(mem, &in[k], &at, &r, &p0, &p1);) {
            if (r->tracked == NULL) {
                inflate_untracked(r, p0, p1, ranges, &nr, max_ranges);
            }
        }
    }
    nr = nwhole + vb_ranges_merge(mem, ranges + nwhole, nr - nwhole);
    return (int)nr;
}

/* Pages [p0, p1) of tracked region r: uncount those no longer ballooned,
 * a word at a time; returns how many were pending. */
static uint64_t deflate_tracked(vb_region *r, uint64_t p0, uint64_t p1)
{
    uint64_t dropped = 0;

    for (uint64_t p = p0; p < p1;) {
        uint64_t bit = p % 64, take = 64 - bit < p1 - p ? 64 - bit : p1 - p;
        uint64_t mask = (take == 64 ? ~(uint64_t)0 : (((uint64_t)1 << take) - 1)) << bit;
        uint64_t gone = r->tracked[p / 64] & ~r->ballooned[p / 64] & mask;

        while (gone != 0) {
            uint64_t q = p - bit + (uint64_t)__builtin_ctzll(gone);
            uint64_t h = huge_of(r, q);

            gone &= gone - 1;
            bit_clear(r->tracked, q);
            r->huge_ballooned[h]--;
            if (bit_test(r->pending, q)) {
                pending_drop(r, q, h);
                dropped++;
            }
        }
        p += take;
    }
    return dropped;
}

uint64_t vb_track_deflate(vb_mem *mem, const vb_range *in, uint32_t n)
{
    uint64_t dropped = 0, p0, p1;
    vb_region *r;

    for (uint32_t k = 0; k < n; k++) {
        for (uint64_t at = in[k].gpa & ~(VB_PAGE_SIZE - 1); next_segment(mem, &in[k], &at, &r, &p0, &p1);) {
            if (r->tracked != NULL) {
                dropped += deflate_tracked(r, p0, p1);
            }
        }
    }
    return dropped;
}

/* ---- pending pages ------------------------------------------------------- */

static int collectable(const vb_region *r)
{
    return r->pending != NULL && r->backing != VB_BACKING_HUGETLBFS;
}

uint32_t vb_track_collect(vb_mem *mem, int region, vb_range *ranges, uint32_t max_ranges)
{
    uint32_t nr = 0;
    uint32_t i = region < 0 ? 0 : (uint32_t)region;
    uint32_t stop = region < 0 ? mem->nregions : (uint32_t)region + 1;

    for (; i < stop && i < mem->nregions; i++) {
        vb_region *r = &mem->regions[i];
        int fresh = 1;          /* the next page may not join ranges[nr - 1] */

        if (!collectable(r) || r->pending_pages == 0) {
            continue;
        }
        for (uint64_t h = 0; h < r->nhuge; h++) {
            uint64_t first, end;

            if (r->huge_pending[h] == 0) {
                continue;
            }
            huge_span(r, h, &first, &end);
            for (uint64_t p = next_set(r->pending, first, end); p < end;
                 p = next_set(r->pending, p + 1, end)) {
                uint64_t gpa = r->gpa + (p << VB_PAGE_SHIFT);

                if (!bit_test(r->ballooned, p)) {
                    pending_drop(r, p, h);      /* see confirm_whole: not ours to free */
                    continue;
                }
                if (!fresh && ranges[nr - 1].gpa + ranges[nr - 1].len == gpa) {
                    ranges[nr - 1].len += VB_PAGE_SIZE;
                } else if (nr == max_ranges) {
                    return nr;  /* the rest stays pending */
                } else {
                    ranges[nr++] = (vb_range){gpa, VB_PAGE_SIZE};
                    fresh = 0;
                }
                pending_drop(r, p, h);
            }
        }
    }
    return nr;
}

uint64_t vb_track_pending(const vb_mem *mem, int collectable_only, uint64_t *oldest_ns)
{
    uint64_t pages = 0, oldest = 0;

    for (uint32_t i = 0; i < mem->nregions; i++) {
        const vb_region *r = &mem->regions[i];

        if (r->pending_pages == 0 || (collectable_only && !collectable(r))) {
            continue;
        }
        pages += r->pending_pages;
        if (oldest == 0 || r->pending_since_ns < oldest) {
            oldest = r->pending_since_ns;
        }
    }
    if (oldest_ns != NULL) {
        *oldest_ns = oldest;
    }
    return pages;
}

/* ---- batch-tracked regions (plain shmem) ---------------------------------- */

static int batch_only(const vb_region *r)
{
    return r->pending != NULL && !r->thp && r->backing == VB_BACKING_SHMEM;
}

uint64_t vb_track_pending_batch(const vb_mem *mem)
{
    uint64_t pages = 0;

    for (uint32_t i = 0; i < mem->nregions; i++) {
        if (batch_only(&mem->regions[i])) {
            pages += mem->regions[i].pending_pages;
        }
    }
    return pages;
}

uint32_t vb_track_collect_batch(vb_mem *mem, vb_range *ranges, uint32_t max_ranges)
{
    uint32_t nr = 0;

    for (uint32_t i = 0; i < mem->nregions && nr < max_ranges; i++) {
        vb_region *r = &mem->regions[i];

        if (batch_only(r) && r->pending_pages) {
            nr += vb_track_collect(mem, (int)i, ranges + nr, max_ranges - nr);
        }
    }
    return nr;
}

uint64_t vb_mem_ballooned_pages(const vb_mem *mem)
{
    uint64_t pages = 0;

    for (uint32_t i = 0; i < mem->nregions; i++) {
        pages += mem->regions[i].ballooned_pages;
    }
    return pages;
}
