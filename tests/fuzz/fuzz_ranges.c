/*
 * libFuzzer harness: the descriptor walker of the reporting and stats queues
 * (vb_vq_pop_ranges) and the helpers that check a reported range
 * (vb_mem_region_of, vb_mem_ballooned_in_range, vb_discard_ranges).
 *
 * Same guest layout as fuzz_ring.c (fuzz_common.h).  Operations:
 *
 *   0 pop        vb_vq_pop_ranges (device-writable or -readable), then each
 *                range is looked up and, when it is a page-aligned range of
 *                one region with no ballooned page, freed as a report would be
 *   1 write      the guest rewrites some bytes
 *   4 pfns       vb_balloon_update (so that ranges overlap ballooned pages)
 *   5 setup      vb_vq_setup again
 *   6 seal       later discards fail
 *   7 remove     vb_mem_remove of a region
 *
 * Checked beyond ASan/UBSan: pop results within their limits, per-buffer
 * counts that add up, every descriptor in the asked direction, nothing
 * consumed on error; region and ballooned-page answers that agree with the
 * harness's own model.
 */
#include "fuzz_common.h"

#define MAX_RANGES 256
#define MAX_HEADS 64
#define VRING_DESC_F_WRITE_ 2
#define VRING_DESC_F_INDIRECT_ 4

static void check_range(fz_guest *g, const vb_desc_range *d, int sealed)
{
    uint64_t page;
    fz_region *fr = d->addr / FZ_PAGE <= 0xffffffffull ? fz_region_of_pfn(g, (uint32_t)(d->addr / FZ_PAGE), &page)
                                                         : NULL;
    int inside = fr != NULL && d->len > 0 && d->len <= fr->size - (d->addr - fr->gpa);
    int region = vb_mem_region_of(g->mem, d->addr, d->len);
    int64_t ballooned = vb_mem_ballooned_in_range(g->mem, d->addr, d->len);
    int aligned = d->addr % FZ_PAGE == 0 && d->len % FZ_PAGE == 0;

    FZ_CHECK((region >= 0) == inside, "vb_mem_region_of(0x%" PRIx64 ", %u) = %d, model says %s",
             d->addr, d->len, region, inside ? "inside" : "outside");
    if (region >= 0) {
        FZ_CHECK(g->mem->regions[region].gpa == fr->gpa, "region %d is not the one at 0x%" PRIx64, region, fr->gpa);
    }
    if (!inside || !aligned) {
        FZ_CHECK(ballooned == -1, "vb_mem_ballooned_in_range(0x%" PRIx64 ", %u) = %" PRId64 " for a bad range",
                 d->addr, d->len, ballooned);
        return;
    }
    {
        int64_t expect = 0;

        for (uint64_t k = 0; k < d->len / FZ_PAGE; k++) {
            expect += fr->shadow[page + k];
        }
        FZ_CHECK(ballooned == expect, "vb_mem_ballooned_in_range(0x%" PRIx64 ", %u) = %" PRId64 ", shadow %" PRId64,
                 d->addr, d->len, ballooned, expect);
    }
    if (ballooned == 0) {   /* a free range the guest reports: freed */
        vb_discard_stats st;
        vb_range one = {d->addr, d->len};

        vb_discard_ranges(g->mem, &one, 1, &st);
        FZ_CHECK(st.bytes_freed + st.bytes_failed == d->len && st.pages_outside == 0,
                 "discard of 0x%" PRIx64 "+%u: freed %" PRIu64 " failed %" PRIu64 " outside %" PRIu64,
                 d->addr, d->len, st.bytes_freed, st.bytes_failed, st.pages_outside);
        FZ_CHECK(sealed || st.bytes_failed == 0, "fallocate on an unsealed memfd failed (errno %d)", st.last_errno);
    }
}

static void op_pop(fz_guest *g, fz_in *in, int sealed)
{
    static vb_desc_range ranges[MAX_RANGES];
    static uint16_t heads[MAX_HEADS];
    static uint32_t counts[MAX_HEADS], lens[MAX_HEADS];
    char err[256];
    uint32_t max_ranges = 1 + fz_u16(in) % MAX_RANGES, max_heads = 1 + fz_u8(in) % MAX_HEADS;
    int writable = fz_u8(in) & 1;
    uint16_t last_before = g->vq.last_avail_idx;
    uint32_t n = 0xdeadbeef, total = 0;
    int popped;

    if (!g->vq_ok) {
        return;
    }
    err[0] = '\0';
    popped = vb_vq_pop_ranges(&g->vq, g->mem, writable, ranges, max_ranges, &n, heads, counts, max_heads,
                              err, sizeof err);
    if (popped < 0) {
        FZ_CHECK(err[0] != '\0', "pop failed without a reason");
        FZ_CHECK(g->vq.last_avail_idx == last_before, "a failed pop consumed buffers");
        FZ_CHECK(n == 0, "a failed pop reported %u ranges", n);
        return;
    }
    FZ_CHECK((uint32_t)popped <= max_heads && (uint32_t)popped <= g->vq.num, "%d buffers popped", popped);
    FZ_CHECK(n <= max_ranges, "%u ranges popped, room for %u", n, max_ranges);
    FZ_CHECK((uint16_t)(g->vq.last_avail_idx - last_before) == (uint16_t)popped, "last_avail_idx off");
    for (int k = 0; k < popped; k++) {
        FZ_CHECK(heads[k] < g->vq.num, "head %u out of range (ring %u)", heads[k], g->vq.num);
        total += counts[k];
        lens[k] = 0;
    }
    FZ_CHECK(total == n, "per-buffer counts add up to %u, %u ranges returned", total, n);
    for (uint32_t k = 0; k < n; k++) {
        FZ_CHECK(((ranges[k].flags & VRING_DESC_F_WRITE_) != 0) == writable,
                 "range %u has flags 0x%x in a %s pop", k, ranges[k].flags, writable ? "writable" : "readable");
        FZ_CHECK(!(ranges[k].flags & VRING_DESC_F_INDIRECT_), "range %u is an INDIRECT descriptor", k);
        check_range(g, &ranges[k], sealed);
    }
    if (popped > 0) {
        vb_vq_push_used(&g->vq, heads, lens, (uint32_t)popped);
        (void)vb_vq_should_signal(&g->vq);
    }
}

static void op_pfns(fz_guest *g, fz_in *in)
{
    static uint32_t pfns[64], changed[64];
    uint32_t n = fz_u8(in) % 64;
    int inflate = fz_u8(in) & 1;

    for (uint32_t k = 0; k < n; k++) {
        const fz_region *fr = &g->reg[fz_u8(in) % FZ_MAX_REGIONS];
        uint8_t page = fz_u8(in);

        pfns[k] = fr->used ? (uint32_t)(fr->gpa / FZ_PAGE + page % (fr->size / FZ_PAGE + 1)) : fz_u32(in);
    }
    fz_balloon_update(g, pfns, n, inflate, changed);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_in in = {data, size};
    fz_guest g;
    int sealed = 0;

    fz_build_memory(&g, &in);
    fz_setup_queue(&g, &in);
    fz_fill_memory(&g, &in);
    for (int op = 0; op < FZ_MAX_OPS && in.left > 0; op++) {
        switch (fz_u8(&in) % 8) {
        case 0:
        case 2:
            op_pop(&g, &in, sealed);
            break;
        case 1:
        case 3:
            fz_guest_write(&g, &in);
            break;
        case 4:
            op_pfns(&g, &in);
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
