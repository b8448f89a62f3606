/*
 * Shared set-up of the native-core fuzz harnesses (libFuzzer + ASan + UBSan).
 *
 * Guest memory: 1 to 3 regions, each added with vb_mem_add on a dup of one
 * small memfd (so fallocate really runs), and then pointed, instead of at
 * vb_mem_add's mmap, at a heap buffer of exactly the region's size.  ASan
 * puts redzones around heap buffers, not around mmaps: any read or write
 * one byte outside a region is reported, which is the property we want
 * (the C core never touches memory outside the guest).  The heap buffer is
 * given back and r->host set to NULL before the table unmaps anything.
 *
 * The input is read front to back by a tiny consumer; once it runs out,
 * every read returns 0.  The first bytes lay out the regions and the
 * queue; the rest is guest memory contents and a list of operations.
 *
 * A shadow of the ballooned bitmap is kept from the PFNs alone, so that
 * every range the tracker hands out to be freed can be checked against
 * what the guest really gave ("never free a page the guest still owns").
 */
#ifndef VB_FUZZ_COMMON_H
#define VB_FUZZ_COMMON_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vb_core.h"

#define FZ_PAGE 4096u
#define FZ_MAX_REGIONS 3
#define FZ_MAX_PAGES 16                       /* per region: 64 KiB */
#define FZ_MEMFD_SIZE (1u << 20)              /* every region lies in this one file */
#define FZ_MAX_OPS 48
#define F_SEAL_FUTURE_WRITE_ 0x0010           /* linux/include/uapi/linux/fcntl.h */

/* A violated invariant: say which, then crash so libFuzzer keeps the input. */
#define FZ_CHECK(cond, ...)                                                        \
    do {                                                                           \
        if (!(cond)) {                                                             \
            fprintf(stderr, "INVARIANT %s:%d: %s: ", __FILE__, __LINE__, #cond);   \
            fprintf(stderr, __VA_ARGS__);                                          \
            fprintf(stderr, "\n");                                                 \
            abort();                                                               \
        }                                                                          \
    } while (0)

/* VB_FUZZ_TRACE=1 in the environment: print each operation (to replay a finding). */
static int fz_tracing = -1;
#define FZ_TRACE(...)                                                              \
    do {                                                                           \
        if (fz_tracing < 0) {                                                      \
            fz_tracing = getenv("VB_FUZZ_TRACE") != NULL;                          \
        }                                                                          \
        if (fz_tracing) {                                                          \
            fprintf(stderr, "trace: " __VA_ARGS__);                                \
            fprintf(stderr, "\n");                                                 \
        }                                                                          \
    } while (0)

/* ---- reading the input ---------------------------------------------------------- */

typedef struct {
    const uint8_t *p;
    size_t left;
} fz_in;

static inline uint8_t fz_u8(fz_in *in)
{
    if (in->left == 0) {
        return 0;
    }
    in->left--;
    return *in->p++;
}

static inline uint16_t fz_u16(fz_in *in)
{
    return (uint16_t)(fz_u8(in) | (uint16_t)fz_u8(in) << 8);
}

static inline uint32_t fz_u32(fz_in *in)
{
    return (uint32_t)fz_u16(in) | (uint32_t)fz_u16(in) << 16;
}

static inline uint64_t fz_u64(fz_in *in)
{
    return (uint64_t)fz_u32(in) | (uint64_t)fz_u32(in) << 32;
}

/* ---- guest memory ----------------------------------------------------------------- */

typedef struct {
    int used;                 /* the region made it into the table */
    uint64_t gpa, size, uaddr, mmap_offset;
    uint8_t *heap;            /* what r->host points at: exactly size bytes */
    uint8_t shadow[FZ_MAX_PAGES]; /* 1: ballooned, by the harness's own reading of the PFNs */
} fz_region;

typedef struct {
    vb_mem *mem;
    int memfd;
    fz_region reg[FZ_MAX_REGIONS];
    vb_vq vq;
    int vq_ok;                /* vb_vq_setup succeeded since the last table change */
    int skipped_deflate;      /* a deflate went without vb_track_deflate (a caller bug, on purpose) */
} fz_guest;

static vb_region *fz_table_region(fz_guest *g, const fz_region *fr)
{
    for (uint32_t i = 0; i < g->mem->nregions; i++) {
        if (g->mem->regions[i].gpa == fr->gpa) {
            return &g->mem->regions[i];
        }
    }
    return NULL;
}

/* The harness region holding pfn, or NULL; *page gets its index in it. */
static fz_region *fz_region_of_pfn(fz_guest *g, uint32_t pfn, uint64_t *page)
{
    uint64_t gpa = (uint64_t)pfn * FZ_PAGE;

    for (int i = 0; i < FZ_MAX_REGIONS; i++) {
        fz_region *fr = &g->reg[i];

        if (fr->used && gpa >= fr->gpa && gpa - fr->gpa < fr->size) {
            *page = (gpa - fr->gpa) / FZ_PAGE;
            return fr;
        }
    }
    return NULL;
}

static void fz_give_back_heap(fz_guest *g, fz_region *fr)
{
    vb_region *r = fz_table_region(g, fr);

    if (r != NULL && r->host == fr->heap) {
        r->host = NULL;   /* region_release then skips munmap */
    }
    free(fr->heap);
    fr->heap = NULL;
}

/* Lays out the regions from the input; returns the number added. */
static int fz_build_memory(fz_guest *g, fz_in *in)
{
    char err[256];
    int nreg = 1 + fz_u8(in) % FZ_MAX_REGIONS;
    int added = 0;

    memset(g, 0, sizeof(*g));
    g->memfd = memfd_create("vb-fuzz", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    FZ_CHECK(g->memfd >= 0, "memfd_create: %s", strerror(errno));
    FZ_CHECK(ftruncate(g->memfd, FZ_MEMFD_SIZE) == 0, "ftruncate: %s", strerror(errno));
    g->mem = vb_mem_new();
    FZ_CHECK(g->mem != NULL, "vb_mem_new");

    for (int i = 0; i < nreg; i++) {
        fz_region *fr = &g->reg[i];
        uint8_t pages_b = fz_u8(in), place = fz_u8(in), off_b = fz_u8(in), ua_b = fz_u8(in);
        uint64_t npages = 1 + pages_b % FZ_MAX_PAGES;
        int fd;
        void *mapped;
        vb_region *r;

        if (place & 0x80) {
            /* At the top of the 32-bit PFN space: the last PFN is 0xffffffff or close. */
            fr->gpa = (((uint64_t)1 << 32) - npages - (place & 0x7)) * FZ_PAGE;
        } else {
            fr->gpa = (uint64_t)(place & 0x7f) * 8 * FZ_PAGE;
        }
        fr->size = npages * FZ_PAGE;
        fr->mmap_offset = (uint64_t)(off_b % 32) * FZ_PAGE;
        fr->uaddr = 0x7f0000000000ull + (uint64_t)i * 0x100000000ull + (uint64_t)(ua_b & 0x3f) * FZ_PAGE
                    + ((ua_b & 0x40) ? (ua_b & 0xf) * 2 : 0);   /* now and then not page aligned */
        fd = dup(g->memfd);
        FZ_CHECK(fd >= 0, "dup: %s", strerror(errno));
        if (vb_mem_add(g->mem, fd, fr->gpa, fr->size, fr->uaddr, fr->mmap_offset, err, sizeof err) < 0) {
            FZ_CHECK(err[0] != '\0', "vb_mem_add failed without a reason");
            close(fd);    /* refused (overlap): the caller still owns the fd */
            continue;
        }
        fr->used = 1;
        added++;
        FZ_TRACE("region gpa 0x%" PRIx64 " size 0x%" PRIx64 " uaddr 0x%" PRIx64 " mmap_offset 0x%" PRIx64,
                 fr->gpa, fr->size, fr->uaddr, fr->mmap_offset);
        r = fz_table_region(g, fr);
        FZ_CHECK(r != NULL && r->fd == fd, "region gpa 0x%" PRIx64 " not in the table", fr->gpa);
        fr->heap = aligned_alloc(64, fr->size);
        FZ_CHECK(fr->heap != NULL, "aligned_alloc");
        memset(fr->heap, 0, fr->size);
        mapped = r->host;
        r->host = fr->heap;
        munmap(mapped, fr->size);
    }
    return added;
}

static void fz_free_memory(fz_guest *g)
{
    for (int i = 0; i < FZ_MAX_REGIONS; i++) {
        if (g->reg[i].used) {
            fz_give_back_heap(g, &g->reg[i]);
        }
    }
    vb_mem_free(g->mem);
    close(g->memfd);
}

/* Fills guest memory from the input: a length, then that many bytes, laid
 * over the regions back to back. */
static void fz_fill_memory(fz_guest *g, fz_in *in)
{
    uint32_t want = fz_u16(in);

    for (int i = 0; i < FZ_MAX_REGIONS && want > 0 && in->left > 0; i++) {
        fz_region *fr = &g->reg[i];
        size_t n;

        if (!fr->used) {
            continue;
        }
        n = want < fr->size ? want : fr->size;
        n = n < in->left ? n : in->left;
        memcpy(fr->heap, in->p, n);
        in->p += n;
        in->left -= n;
        want -= (uint32_t)n;
    }
}

/* A guest write while the device works: bytes from the input at an offset. */
static void fz_guest_write(fz_guest *g, fz_in *in)
{
    fz_region *fr = &g->reg[fz_u8(in) % FZ_MAX_REGIONS];
    uint16_t off = fz_u16(in);
    uint8_t len = fz_u8(in);

    if (!fr->used) {
        return;
    }
    for (uint8_t k = 0; k < len; k++) {
        uint8_t b = fz_u8(in);

        fr->heap[(off + k) % fr->size] = b;
    }
}

/* A guest address for a ring part: mostly inside a region, near its end or
 * past it by a little, now and then any 64-bit value. */
static uint64_t fz_ring_uaddr(fz_guest *g, fz_in *in)
{
    uint8_t sel = fz_u8(in);
    const fz_region *fr = &g->reg[sel % FZ_MAX_REGIONS];
    uint16_t off = fz_u16(in);

    if ((sel & 0xe0) == 0xe0 || !fr->used) {
        return fz_u64(in);
    }
    return fr->uaddr + off % (fr->size + 64);
}

static void fz_setup_queue(fz_guest *g, fz_in *in)
{
    char err[256];
    uint32_t num = 1u << (fz_u8(in) % 9);      /* 1 .. 256 */
    uint8_t flags = fz_u8(in);
    uint16_t base = (flags & 0x4) ? fz_u16(in) : 0;
    uint64_t desc = fz_ring_uaddr(g, in), avail = fz_ring_uaddr(g, in), used = fz_ring_uaddr(g, in);

    err[0] = '\0';
    g->vq_ok = vb_vq_setup(&g->vq, g->mem, num, desc, avail, used, base,
                           flags & 0x1, flags & 0x2, err, sizeof err) == 0;
    FZ_TRACE("vq_setup num %u desc 0x%" PRIx64 " avail 0x%" PRIx64 " used 0x%" PRIx64 " base %u flags 0x%x: %s",
             num, desc, avail, used, base, flags, g->vq_ok ? "ok" : err);
    FZ_CHECK(g->vq_ok || err[0] != '\0', "vb_vq_setup failed without a reason");
    FZ_CHECK(g->vq_ok == (g->vq.ready != 0), "ready %d after setup returned %d", g->vq.ready, g->vq_ok);
}

/* ---- operations both harnesses have ---------------------------------------------- */

/* F_SEAL_FUTURE_WRITE on the memfd when the input says so: later discards
 * fail.  Reads no byte once sealed. */
static void fz_seal(fz_guest *g, fz_in *in, int *sealed)
{
    if (!*sealed && fz_u8(in) == 0x5e) {
        *sealed = fcntl(g->memfd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE_) == 0;
    }
}

/* vb_mem_remove of the region the input picks, if it is there (the queue
 * must be set up again). */
static void fz_remove_region(fz_guest *g, fz_in *in)
{
    char err[256];
    fz_region *fr = &g->reg[fz_u8(in) % FZ_MAX_REGIONS];

    if (!fr->used) {
        return;
    }
    fz_give_back_heap(g, fr);
    FZ_CHECK(vb_mem_remove(g->mem, fr->gpa, fr->size, err, sizeof err) == 0, "remove: %s", err);
    FZ_TRACE("remove region 0x%" PRIx64, fr->gpa);
    fr->used = 0;
    g->vq_ok = 0;   /* its pointers may be into the region that went (native.py refuses them too) */
}

/* ---- the ballooned bitmap, seen from outside ------------------------------------- */

/* Applies what vb_balloon_update should do to the shadow and checks that it
 * did exactly that (changed[], counts, the table's own bitmap). */
static void fz_check_balloon_update(fz_guest *g, const uint32_t *pfns, uint32_t n, int inflate,
                                    const uint32_t *changed, uint32_t nchanged,
                                    uint32_t n_invalid, uint32_t n_unchanged)
{
    uint32_t expect_changed = 0, expect_invalid = 0, expect_unchanged = 0;

    for (uint32_t k = 0; k < n; k++) {
        uint64_t page;
        fz_region *fr = fz_region_of_pfn(g, pfns[k], &page);

        if (fr == NULL) {
            expect_invalid++;
        } else if (fr->shadow[page] == (inflate ? 1 : 0)) {
            expect_unchanged++;
        } else {
            fr->shadow[page] = inflate ? 1 : 0;
            FZ_CHECK(expect_changed < nchanged && changed[expect_changed] == pfns[k],
                     "changed[%u] should be PFN 0x%x", expect_changed, pfns[k]);
            expect_changed++;
        }
    }
    FZ_CHECK(nchanged == expect_changed, "%u changed, expected %u", nchanged, expect_changed);
    FZ_CHECK(n_invalid == expect_invalid, "%u invalid, expected %u", n_invalid, expect_invalid);
    FZ_CHECK(n_unchanged == expect_unchanged, "%u unchanged, expected %u", n_unchanged, expect_unchanged);
    for (int i = 0; i < FZ_MAX_REGIONS; i++) {
        fz_region *fr = &g->reg[i];
        vb_region *r;
        uint64_t count = 0;

        if (!fr->used) {
            continue;
        }
        r = fz_table_region(g, fr);
        for (uint64_t p = 0; p < fr->size / FZ_PAGE; p++) {
            int bit = (r->ballooned[p / 64] >> (p % 64)) & 1;

            FZ_CHECK(bit == fr->shadow[p], "region 0x%" PRIx64 " page %" PRIu64 ": bitmap %d, shadow %d",
                     fr->gpa, p, bit, fr->shadow[p]);
            count += bit;
        }
        FZ_CHECK(r->ballooned_pages == count, "ballooned_pages %" PRIu64 ", bitmap has %" PRIu64,
                 r->ballooned_pages, count);
    }
}

/* The pages of ranges as PFNs, in order, into pfns[] (room for max). */
static uint32_t fz_range_pfns(const vb_range *ranges, uint32_t n, uint32_t *pfns, uint32_t max)
{
    uint32_t out = 0;

    for (uint32_t k = 0; k < n; k++) {
        for (uint64_t a = ranges[k].gpa; a < ranges[k].gpa + ranges[k].len; a += FZ_PAGE) {
            FZ_CHECK(out < max, "ranges hold more than %u pages", max);
            pfns[out++] = (uint32_t)(a / FZ_PAGE);
        }
    }
    return out;
}

static int fz_cmp_u32(const void *x, const void *y)
{
    uint32_t a = *(const uint32_t *)x, b = *(const uint32_t *)y;

    return (a > b) - (a < b);
}

/* vb_balloon_update of n PFNs (as the PFN32 sink makes ranges of them),
 * checked as above; returns how many pages changed (in changed[], which
 * has room for n, as PFNs in input order). */
static uint32_t fz_balloon_update(fz_guest *g, const uint32_t *pfns, uint32_t n, int inflate, uint32_t *changed)
{
    vb_range *in = malloc((n ? n : 1) * sizeof(vb_range)), *out = malloc((n ? n : 1) * sizeof(vb_range));
    uint32_t nin = vb_ranges_from_pfns(g->mem, pfns, n, in), nchanged;
    vb_update st;
    int nr;

    uint32_t *order = malloc((n ? n : 1) * sizeof(uint32_t)), *a = malloc((n ? n : 1) * sizeof(uint32_t));

    FZ_CHECK(in != NULL && out != NULL && order != NULL && a != NULL, "out of memory");
    /* The ranges hold every input page exactly once (a run may be read
     * descending and stored ascending): the same multiset... */
    FZ_CHECK(fz_range_pfns(in, nin, order, n) == n, "ranges from %u PFNs hold another count", n);
    memcpy(a, pfns, n * sizeof(uint32_t));
    qsort(a, n, sizeof(uint32_t), fz_cmp_u32);
    {
        uint32_t *b = malloc((n ? n : 1) * sizeof(uint32_t));

        FZ_CHECK(b != NULL, "out of memory");
        memcpy(b, order, n * sizeof(uint32_t));
        qsort(b, n, sizeof(uint32_t), fz_cmp_u32);
        FZ_CHECK(memcmp(a, b, n * sizeof(uint32_t)) == 0, "ranges from PFNs are not the same pages");
        free(b);
    }
    nr = vb_balloon_update(g->mem, in, nin, inflate, 0, out, n, &st);
    FZ_CHECK(nr >= 0, "vb_balloon_update refused room for %u pages", n);
    nchanged = fz_range_pfns(out, (uint32_t)nr, changed, n);
    FZ_CHECK(st.changed_pages == nchanged, "changed_pages %" PRIu64 ", ranges hold %u", st.changed_pages, nchanged);
    /* ...and the update judges them page by page in the ranges' order. */
    fz_check_balloon_update(g, order, n, inflate, changed, nchanged, (uint32_t)st.invalid_pages,
                            (uint32_t)st.unchanged_pages);
    free(order);
    free(a);
    free(in);
    free(out);
    return nchanged;
}

/* After the tracker has seen an update (vb_track_inflate / vb_track_deflate):
 * pending pages are ballooned ones.  Only while the caller keeps the
 * contract: a skipped vb_track_deflate leaves stale pending pages, which the
 * tracker drops when it meets them (and never hands out, which
 * fz_check_range_is_ballooned checks every time). */
static void fz_check_pending(fz_guest *g)
{
    for (int i = 0; i < FZ_MAX_REGIONS && !g->skipped_deflate; i++) {
        fz_region *fr = &g->reg[i];
        vb_region *r;

        if (!fr->used) {
            continue;
        }
        r = fz_table_region(g, fr);
        FZ_CHECK(r->pending_pages <= r->ballooned_pages, "region 0x%" PRIx64 ": %" PRIu64 " pending of %" PRIu64
                 " ballooned", fr->gpa, r->pending_pages, r->ballooned_pages);
        if (r->pending != NULL) {
            for (uint64_t p = 0; p < fr->size / FZ_PAGE; p++) {
                int pending = (r->pending[p / 64] >> (p % 64)) & 1;

                FZ_CHECK(!pending || fr->shadow[p], "region 0x%" PRIx64 " page %" PRIu64
                         " is pending but the guest took it back", fr->gpa, p);
            }
        }
    }
}

/* A range about to be freed: 4 KiB aligned, non-empty, inside one region,
 * and every page of it given by the guest (shadow). */
static void fz_check_range_is_ballooned(fz_guest *g, const vb_range *rg, const char *who)
{
    uint64_t page;
    fz_region *fr;

    FZ_CHECK(rg->len > 0 && rg->gpa % FZ_PAGE == 0 && rg->len % FZ_PAGE == 0,
             "%s: range 0x%" PRIx64 "+0x%" PRIx64 " is empty or not page aligned", who, rg->gpa, rg->len);
    FZ_CHECK(rg->gpa / FZ_PAGE <= 0xffffffffull, "%s: range 0x%" PRIx64 " beyond 32-bit PFNs", who, rg->gpa);
    fr = fz_region_of_pfn(g, (uint32_t)(rg->gpa / FZ_PAGE), &page);
    FZ_CHECK(fr != NULL && rg->len <= fr->size - (rg->gpa - fr->gpa),
             "%s: range 0x%" PRIx64 "+0x%" PRIx64 " is not inside one region", who, rg->gpa, rg->len);
    for (uint64_t k = 0; k < rg->len / FZ_PAGE; k++) {
        FZ_CHECK(fr->shadow[page + k], "%s: range 0x%" PRIx64 "+0x%" PRIx64 " frees page 0x%" PRIx64
                 " that the guest did not give (or took back)", who, rg->gpa, rg->len,
                 rg->gpa / FZ_PAGE + k);
    }
}

/* Frees ranges the way the session does, and checks the accounting. */
static void fz_discard(fz_guest *g, const vb_range *ranges, uint32_t n, int sealed)
{
    vb_discard_stats st;
    uint64_t total = 0;

    for (uint32_t k = 0; k < n; k++) {
        total += ranges[k].len;
    }
    vb_discard_ranges(g->mem, ranges, n, &st);
    FZ_CHECK(st.pages_outside == 0, "%" PRIu64 " pages outside guest memory in ranges from the tracker",
             st.pages_outside);
    FZ_CHECK(st.bytes_freed + st.bytes_failed == total, "freed %" PRIu64 " + failed %" PRIu64 " != %" PRIu64,
             st.bytes_freed, st.bytes_failed, total);
    FZ_CHECK(sealed || st.bytes_failed == 0, "fallocate on an unsealed memfd failed (errno %d)", st.last_errno);
    FZ_CHECK(st.bytes_shmem + st.bytes_hugetlbfs + st.bytes_file == st.bytes_freed, "by-backing sums differ");
}

#endif
