/*
 * libFuzzer harness: the split-ring walker and everything a popped batch goes
 * through in the session (csrc/vring.c, mem.c, track.c, discard.c).
 *
 * The input lays out 1..3 guest regions (heap buffers of exactly their size,
 * see fuzz_common.h) and one queue, fills guest memory (rings, descriptors,
 * indirect tables, PFN arrays: all of it from the input), then runs a list
 * of operations:
 *
 *   0 pop        vb_vq_pop_pfn32 or (mode bit 8) vb_vq_pop_extents, then
 *                as the worker: vb_balloon_update, vb_track_inflate
 *                (+ discard) or vb_track_deflate, vb_vq_push_used,
 *                vb_vq_should_signal, vb_vq_pending
 *   1 write      the guest rewrites some bytes (rings change under us)
 *   2 collect    vb_track_collect (+ discard) of one region or all
 *   3 configure  vb_track_configure: granule, backing, THP
 *   4 pfns       vb_balloon_update with PFNs picked around the regions,
 *                sometimes without the vb_track_deflate a deflate needs
 *   5 setup      vb_vq_setup again with other sizes and addresses
 *   6 seal       F_SEAL_FUTURE_WRITE on the memfd: later discards fail
 *   7 remove     vb_mem_remove of a region (the queue must be set up again)
 *
 * Checked beyond ASan/UBSan: pop results within their limits and nothing
 * consumed on error; the bitmap matches a shadow model; every range handed
 * out to be freed holds only pages the guest gave and did not take back;
 * discard accounting adds up.
 */
#include "fuzz_common.h"

#define MAX_PFNS 1024
#define MAX_HEADS 64

/* What the session does with a batch of PFNs: vb_balloon_update, then
 * vb_track_inflate (+ discard) on an inflate, or vb_track_deflate on a
 * deflate unless track_deflate is 0; each step checked.  changed[] and
 * ranges[] have room for n. */
static void balloon_and_track(fz_guest *g, const uint32_t *pfns, uint32_t n, int inflate, int track_deflate,
                              int sealed, uint32_t *changed, vb_range *ranges)
{
    uint32_t nchanged = fz_balloon_update(g, pfns, n, inflate, changed);
    static vb_range in[MAX_PFNS];
    uint32_t nin = vb_ranges_from_pfns(g->mem, changed, nchanged, in);

    if (inflate) {
        int nr = vb_track_inflate(g->mem, in, nin, ranges, nin);

        FZ_CHECK(nr >= 0 && (uint32_t)nr <= nchanged, "vb_track_inflate returned %d for %u PFNs", nr, nchanged);
        for (int k = 0; k < nr; k++) {
            fz_check_range_is_ballooned(g, &ranges[k], "vb_track_inflate");
        }
        fz_discard(g, ranges, (uint32_t)nr, sealed);
        fz_check_pending(g);
    } else if (track_deflate) {
        vb_track_deflate(g->mem, in, nin);
        fz_check_pending(g);
    }
}

/* An extents batch as the worker serves it: every range the sink kept is
 * aligned, non-empty and inside one region, and no two of one buffer
 * overlap (checked in the sink; here only in and out of the table); the
 * update judges each whole (an inflate of ballooned pages is refused),
 * the shadow follows the same rule; then the tracker. */
static void extents_and_track(fz_guest *g, const vb_range *got, uint32_t n, int inflate, int sealed,
                              vb_range *ranges)
{
    static vb_range changed[MAX_PFNS];
    vb_update st;
    uint64_t refused = 0, flipped = 0;
    int nr;

    for (uint32_t k = 0; k < n; k++) {
        FZ_CHECK(got[k].len != 0 && ((got[k].gpa | got[k].len) % FZ_PAGE) == 0 &&
                 vb_mem_region_of(g->mem, got[k].gpa, got[k].len) >= 0,
                 "extents sink kept 0x%" PRIx64 "+0x%" PRIx64, got[k].gpa, got[k].len);
    }
    nr = vb_balloon_update(g->mem, got, n, inflate, 1, changed, MAX_PFNS, &st);
    FZ_CHECK(nr >= 0, "vb_balloon_update(whole) refused room for %u ranges", n);
    /* The shadow, range by range. */
    for (uint32_t k = 0; k < n; k++) {
        uint64_t first = got[k].gpa / FZ_PAGE, pages = got[k].len / FZ_PAGE, page, any = 0;
        fz_region *fr = fz_region_of_pfn(g, (uint32_t)first, &page);

        FZ_CHECK(fr != NULL, "kept range 0x%" PRIx64 " is in no region", got[k].gpa);
        for (uint64_t p = 0; p < pages; p++) {
            any |= fr->shadow[page + p];
        }
        if (inflate && any) {
            refused++;
            continue;
        }
        for (uint64_t p = 0; p < pages; p++) {
            flipped += fr->shadow[page + p] != (inflate ? 1 : 0);
            fr->shadow[page + p] = inflate ? 1 : 0;
        }
    }
    FZ_CHECK(st.refused == refused && st.changed_pages == flipped,
             "whole update: refused %" PRIu64 " changed %" PRIu64 ", shadow says %" PRIu64 " and %" PRIu64,
             st.refused, st.changed_pages, refused, flipped);
    if (inflate) {
        nr = vb_track_inflate(g->mem, changed, (uint32_t)nr, ranges, (uint32_t)nr);
        FZ_CHECK(nr >= 0, "vb_track_inflate returned %d", nr);
        for (int k = 0; k < nr; k++) {
            fz_check_range_is_ballooned(g, &ranges[k], "vb_track_inflate (extents)");
        }
        fz_discard(g, ranges, (uint32_t)nr, sealed);
    } else {
        vb_track_deflate(g->mem, got, n);
    }
    fz_check_pending(g);
}

static void op_pop(fz_guest *g, fz_in *in, int sealed)
{
    static uint32_t pfns[MAX_PFNS], changed[MAX_PFNS];
    static uint16_t heads[MAX_HEADS];
    static vb_range ranges[MAX_PFNS];
    char err[256];
    uint32_t max_pfns = 1 + fz_u16(in) % MAX_PFNS, max_heads = 1 + fz_u8(in) % MAX_HEADS;
    uint8_t how = fz_u8(in);
    int inflate = how & 1;
    uint16_t last_before = g->vq.last_avail_idx;
    uint32_t n = 0xdeadbeef;
    int popped;

    if (!g->vq_ok) {
        return;
    }
    err[0] = '\0';
    {
        static vb_range got[MAX_PFNS];
        vb_batch batch;

        if (how & 8) {
            popped = vb_vq_pop_extents(&g->vq, g->mem, got, max_pfns, &batch, heads, max_heads, err, sizeof err);
        } else {
            popped = vb_vq_pop_pfn32(&g->vq, g->mem, got, max_pfns, &batch, heads, max_heads, err, sizeof err);
        }
        if (popped < 0) {
            n = 0;
        } else if (how & 8) {
            FZ_CHECK(batch.n_ranges + batch.refused == batch.items, "extents: %u kept + %" PRIu64
                     " refused of %" PRIu64, batch.n_ranges, batch.refused, batch.items);
            n = (uint32_t)batch.items;
            FZ_TRACE("pop extents max %u max_heads %u %s: %d buffers, %u ranges", max_pfns, max_heads,
                     inflate ? "inflate" : "deflate", popped, batch.n_ranges);
            FZ_CHECK(n <= max_pfns, "%u ranges popped, room for %u", n, max_pfns);
            extents_and_track(g, got, batch.n_ranges, inflate, sealed, ranges);
            goto pushed;
        } else {
            n = fz_range_pfns(got, batch.n_ranges, pfns, MAX_PFNS);
            FZ_CHECK(n == batch.items, "pfn32: ranges cover %u pages of %" PRIu64 " PFNs", n, batch.items);
        }
    }
    FZ_TRACE("pop max_pfns %u max_heads %u %s: %d buffers, %u PFNs %s", max_pfns, max_heads,
             inflate ? "inflate" : "deflate", popped, popped < 0 ? 0 : n, popped < 0 ? err : "");
    if (popped < 0) {
        FZ_CHECK(err[0] != '\0', "pop failed without a reason");
        FZ_CHECK(g->vq.last_avail_idx == last_before, "a failed pop consumed buffers (%u -> %u)",
                 last_before, g->vq.last_avail_idx);
        FZ_CHECK(n == 0, "a failed pop reported %u PFNs", n);
        return;
    }
    FZ_CHECK((uint32_t)popped <= max_heads && (uint32_t)popped <= g->vq.num,
             "%d buffers popped (max_heads %u, ring %u)", popped, max_heads, g->vq.num);
    FZ_CHECK(n <= max_pfns, "%u PFNs popped, room for %u", n, max_pfns);
    FZ_CHECK(popped > 0 || n == 0, "no buffer popped but %u PFNs", n);
    FZ_CHECK((uint16_t)(g->vq.last_avail_idx - last_before) == (uint16_t)popped,
             "last_avail_idx moved by %u for %d buffers", (uint16_t)(g->vq.last_avail_idx - last_before), popped);
    for (int k = 0; k < popped; k++) {
        FZ_CHECK(heads[k] < g->vq.num, "head %u out of range (ring %u)", heads[k], g->vq.num);
    }

    balloon_and_track(g, pfns, n, inflate, 1, sealed, changed, ranges);
pushed:
    if (popped > 0) {
        uint32_t lens[MAX_HEADS];

        for (int k = 0; k < popped; k++) {
            lens[k] = (how & 2) ? 0 : (uint32_t)k;
        }
        vb_vq_push_used(&g->vq, heads, (how & 4) ? lens : NULL, (uint32_t)popped);
        (void)vb_vq_should_signal(&g->vq);
    }
    {
        int pending = vb_vq_pending(&g->vq);

        FZ_CHECK(pending >= -1 && pending <= (int)g->vq.num, "vb_vq_pending %d (ring %u)", pending, g->vq.num);
    }
}

static void op_collect(fz_guest *g, fz_in *in, int sealed)
{
    static vb_range ranges[FZ_MAX_REGIONS * FZ_MAX_PAGES];
    uint8_t sel = fz_u8(in);
    int region = sel == 0xff ? -1 : (int)(sel % 4);   /* 3: no such region */
    uint32_t max_ranges = 1 + fz_u8(in) % (FZ_MAX_REGIONS * FZ_MAX_PAGES);
    uint64_t oldest;
    uint64_t before = vb_track_pending(g->mem, 1, &oldest);
    uint32_t nr, taken = 0;

    if (region >= (int)g->mem->nregions) {
        region = -1;
    }
    nr = vb_track_collect(g->mem, region, ranges, max_ranges);
    FZ_TRACE("collect region %d max %u: %u ranges (%" PRIu64 " pages were pending)", region, max_ranges, nr, before);
    FZ_CHECK(nr <= max_ranges, "vb_track_collect returned %u ranges, room for %u", nr, max_ranges);
    for (uint32_t k = 0; k < nr; k++) {
        fz_check_range_is_ballooned(g, &ranges[k], "vb_track_collect");
        taken += (uint32_t)(ranges[k].len / FZ_PAGE);
    }
    FZ_CHECK(taken <= before, "collected %u pages, %" PRIu64 " were pending", taken, before);
    fz_discard(g, ranges, nr, sealed);
    fz_check_pending(g);
}

static void op_configure(fz_guest *g, fz_in *in)
{
    static const uint64_t granules[] = {4096, 8192, 16384, 32768, 65536, 2u << 20, 3000, 0};
    char err[256];
    uint32_t region = fz_u8(in) % 4;
    uint8_t b = fz_u8(in);

    err[0] = '\0';
    if (vb_track_configure(g->mem, region, granules[b % 8], (b >> 3) % 4, (b >> 5) & 1, err, sizeof err) < 0) {
        FZ_CHECK(err[0] != '\0', "vb_track_configure failed without a reason");
    }
    FZ_TRACE("configure region %u granule %" PRIu64 " backing %d thp %d: %s", region, granules[b % 8],
             (b >> 3) % 4, (b >> 5) & 1, err[0] ? err : "ok");
}

static void op_pfns(fz_guest *g, fz_in *in, int sealed)
{
    static uint32_t pfns[64], changed[64];
    static vb_range ranges[64];
    uint32_t n = fz_u8(in) % 64;
    uint8_t how = fz_u8(in);
    int inflate = how & 1;

    for (uint32_t k = 0; k < n; k++) {
        uint8_t sel = fz_u8(in);
        const fz_region *fr = &g->reg[sel % FZ_MAX_REGIONS];
        int8_t delta = (int8_t)fz_u8(in);

        if ((sel & 0xc0) == 0xc0 || !fr->used) {
            pfns[k] = fz_u32(in);
        } else {   /* near the region: inside, or just before or after it */
            pfns[k] = (uint32_t)(fr->gpa / FZ_PAGE + (uint64_t)(int64_t)delta % (fr->size / FZ_PAGE + 2));
        }
    }
    if (!inflate && (how & 2)) {
        g->skipped_deflate = 1;
    }
    for (uint32_t k = 0; k < n; k++) {
        FZ_TRACE("  pfn 0x%x", pfns[k]);
    }
    FZ_TRACE("pfns %u %s%s", n, inflate ? "inflate" : "deflate", !inflate && (how & 2) ? " (no vb_track_deflate)" : "");
    balloon_and_track(g, pfns, n, inflate, !(how & 2), sealed, changed, ranges);
    /* how & 2 on a deflate: the caller "forgot" vb_track_deflate.  The
     * tracker must still never hand out those pages (checked on the next
     * inflate or collect against the shadow). */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_in in = {data, size};
    fz_guest g;
    int sealed = 0;

    fz_build_memory(&g, &in);
    for (int i = 0; i < FZ_MAX_REGIONS; i++) {
        uint8_t b = fz_u8(&in);

        if (b & 0x80) {
            char err[256];

            int rc = vb_track_configure(g.mem, (uint32_t)i, (uint64_t)FZ_PAGE << (b % 4), (b >> 2) % 3,
                                        (b >> 4) & 1, err, sizeof err);

            FZ_TRACE("configure region %d granule %u: %s", i, FZ_PAGE << (b % 4), rc == 0 ? "ok" : err);
        }
    }
    fz_setup_queue(&g, &in);
    fz_fill_memory(&g, &in);
    for (int op = 0; op < FZ_MAX_OPS && in.left > 0; op++) {
        switch (fz_u8(&in) % 8) {
        case 0:
            op_pop(&g, &in, sealed);
            break;
        case 1:
            fz_guest_write(&g, &in);
            break;
        case 2:
            op_collect(&g, &in, sealed);
            break;
        case 3:
            op_configure(&g, &in);
            break;
        case 4:
            op_pfns(&g, &in, sealed);
            break;
        case 5:
            fz_setup_queue(&g, &in);
            break;
        case 6:
            fz_seal(&g, &in, &sealed);
            break;
        default:
            fz_remove_region(&g, &in);
            break;
        }
    }
    fz_free_memory(&g);
    return 0;
}
