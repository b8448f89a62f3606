/*
 * Guest memory table: the regions the front-end shares with us, mapped
 * MAP_SHARED so that what we read is what the guest wrote, plus the
 * per-page "ballooned" bitmap of each region and its update by ranges.
 *
 * The bottom of the core: every other core file uses this one, this one
 * uses none of them.  It owns every array hanging off a vb_region (the
 * tracker's too: vb_region_drop_tracking), so that a region goes away here
 * in one place.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "vb_internal.h"

/* f_type values, linux/include/uapi/linux/magic.h. */
#define TMPFS_MAGIC_VALUE 0x01021994
#define HUGETLBFS_MAGIC_VALUE 0x958458f6

int vb_fd_backing(int fd, uint64_t *block)
{
    struct statfs sfs;

    if (fstatfs(fd, &sfs) < 0) {
        return -1;
    }
    *block = (uint64_t)sfs.f_bsize;
    switch ((uint32_t)sfs.f_type) {
    case TMPFS_MAGIC_VALUE:
        return VB_BACKING_SHMEM;
    case HUGETLBFS_MAGIC_VALUE:
        return VB_BACKING_HUGETLBFS;
    default:
        return VB_BACKING_FILE;
    }
}

vb_mem *vb_mem_new(void)
{
    return calloc(1, sizeof(vb_mem));
}

void vb_region_drop_tracking(vb_region *r)
{
    free(r->huge_ballooned);
    free(r->huge_pending);
    free(r->tracked);
    free(r->pending);
    free(r->huge_cut);
    r->huge_ballooned = r->huge_pending = NULL;
    r->tracked = r->pending = r->huge_cut = NULL;
    r->granule = VB_PAGE_SIZE;
    r->huge_first = r->nhuge = 0;
    r->pending_pages = 0;
    r->pending_since_ns = 0;
}

static void region_release(vb_region *r)
{
    if (r->host != NULL) {
        munmap(r->host, r->size);
    }
    if (r->fd >= 0) {
        close(r->fd);
    }
    free(r->ballooned);
    vb_region_drop_tracking(r);
    memset(r, 0, sizeof(*r));
    r->fd = -1;
}

void vb_mem_clear(vb_mem *mem)
{
    uint32_t i;

    if (mem == NULL) {
        return;
    }
    for (i = 0; i < mem->nregions; i++) {
        region_release(&mem->regions[i]);
    }
    mem->nregions = 0;
}

void vb_mem_free(vb_mem *mem)
{
    vb_mem_clear(mem);
    free(mem);
}

/* [a, a+alen) and [b, b+blen) intersect; callers guarantee no overflow. */
static int ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

int vb_mem_add(vb_mem *mem, int fd, uint64_t gpa, uint64_t size,
               uint64_t uaddr, uint64_t mmap_offset, char *err, size_t errlen)
{
    uint32_t i, pos;
    uint64_t words, fs_block = 0;
    void *host;
    uint64_t *bitmap;
    int backing;

    if (size == 0) {
        vb_seterr(err, errlen, "region gpa 0x%" PRIx64 " has size 0", gpa);
        return -1;
    }
    if ((gpa | size | mmap_offset) & (VB_PAGE_SIZE - 1)) {
        vb_seterr(err, errlen,
                  "region gpa 0x%" PRIx64 " size 0x%" PRIx64 " mmap_offset 0x%" PRIx64
                  " is not 4 KiB aligned", gpa, size, mmap_offset);
        return -1;
    }
    if (gpa + size < gpa || uaddr + size < uaddr || mmap_offset + size < mmap_offset) {
        vb_seterr(err, errlen,
                  "region gpa 0x%" PRIx64 " size 0x%" PRIx64 " uaddr 0x%" PRIx64
                  " mmap_offset 0x%" PRIx64 " overflows 64 bits",
                  gpa, size, uaddr, mmap_offset);
        return -1;
    }
    if (size > (uint64_t)SIZE_MAX) {
        vb_seterr(err, errlen, "region size 0x%" PRIx64 " does not fit in size_t", size);
        return -1;
    }
    if (fd < 0) {
        vb_seterr(err, errlen, "region gpa 0x%" PRIx64 ": bad fd %d", gpa, fd);
        return -1;
    }
    if (mem->nregions >= VB_MAX_MEM_REGIONS) {
        vb_seterr(err, errlen,
                  "region gpa 0x%" PRIx64 " size 0x%" PRIx64 ": memory table full (%d regions)",
                  gpa, size, VB_MAX_MEM_REGIONS);
        return -1;
    }
    for (i = 0; i < mem->nregions; i++) {
        const vb_region *r = &mem->regions[i];

        if (ranges_overlap(gpa, size, r->gpa, r->size)) {
            vb_seterr(err, errlen,
                      "region gpa 0x%" PRIx64 " size 0x%" PRIx64 " overlaps region %" PRIu32
                      " (gpa 0x%" PRIx64 " size 0x%" PRIx64 ")", gpa, size, i, r->gpa, r->size);
            return -1;
        }
        if (ranges_overlap(uaddr, size, r->uaddr, r->size)) {
            vb_seterr(err, errlen,
                      "region uaddr 0x%" PRIx64 " size 0x%" PRIx64 " overlaps region %" PRIu32
                      " (uaddr 0x%" PRIx64 " size 0x%" PRIx64 ")",
                      uaddr, size, i, r->uaddr, r->size);
            return -1;
        }
    }

    /* A mapping past the end of a file faults (SIGBUS) on first touch, so a
     * region the file cannot cover is refused here.  Only files have a
     * meaningful size; a shared /dev/zero mapping, say, has none. */
    {
        struct stat st;

        if (fstat(fd, &st) < 0) {
            int e = errno;

            vb_seterr(err, errlen, "region gpa 0x%" PRIx64 ": fstat of fd %d failed: %s",
                      gpa, fd, strerror(e));
            return -1;
        }
        if (S_ISREG(st.st_mode) && (uint64_t)st.st_size < mmap_offset + size) {
            vb_seterr(err, errlen,
                      "region gpa 0x%" PRIx64 " size 0x%" PRIx64 " at mmap_offset 0x%" PRIx64
                      " extends past the end of fd %d (file size 0x%" PRIx64 ")",
                      gpa, size, mmap_offset, fd, (uint64_t)st.st_size);
            return -1;
        }
    }

    /* What the fd lives on decides how huge pages can be freed.  fstat
     * worked, so fstatfs of the same fd fails only in theory: then it is
     * treated as a plain file (no huge pages assumed). */
    backing = vb_fd_backing(fd, &fs_block);
    if (backing < 0) {
        backing = VB_BACKING_FILE;
        fs_block = 0;
    }

    /* MAP_NORESERVE: guest RAM is mostly not ours to account for; the
     * front-end already committed to it. */
    host = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                fd, (off_t)mmap_offset);
    if (host == MAP_FAILED) {
        int e = errno;

        vb_seterr(err, errlen,
                  "region gpa 0x%" PRIx64 " size 0x%" PRIx64 ": mmap of fd %d at offset 0x%"
                  PRIx64 " failed: %s", gpa, size, fd, mmap_offset, strerror(e));
        return -1;
    }
    words = ((size >> VB_PAGE_SHIFT) + 63) / 64;
    bitmap = calloc((size_t)words, sizeof(uint64_t));
    if (bitmap == NULL) {
        munmap(host, (size_t)size);
        vb_seterr(err, errlen,
                  "region gpa 0x%" PRIx64 " size 0x%" PRIx64 ": no memory for a %" PRIu64
                  "-word bitmap", gpa, size, words);
        return -1;
    }

    /* Keep the table sorted by gpa so lookups can bisect. */
    for (pos = 0; pos < mem->nregions && mem->regions[pos].gpa < gpa; pos++) {
    }
    memmove(&mem->regions[pos + 1], &mem->regions[pos],
            (mem->nregions - pos) * sizeof(vb_region));
    mem->regions[pos] = (vb_region){
        .gpa = gpa,
        .size = size,
        .uaddr = uaddr,
        .mmap_offset = mmap_offset,
        .fd = fd,
        .host = host,
        .ballooned = bitmap,
        .ballooned_pages = 0,
        .discard_errno = 0,
        .discard_method = VB_DISCARD_UNTRIED,
        .backing = backing,
        .fs_block = fs_block,
        .granule = VB_PAGE_SIZE,    /* no deferral until vb_track_configure */
    };
    mem->nregions++;
    return 0;
}

int vb_mem_remove(vb_mem *mem, uint64_t gpa, uint64_t size, char *err, size_t errlen)
{
    uint32_t i;

    for (i = 0; i < mem->nregions; i++) {
        if (mem->regions[i].gpa == gpa && mem->regions[i].size == size) {
            region_release(&mem->regions[i]);
            memmove(&mem->regions[i], &mem->regions[i + 1],
                    (mem->nregions - i - 1) * sizeof(vb_region));
            mem->nregions--;
            return 0;
        }
    }
    vb_seterr(err, errlen,
              "no region with gpa 0x%" PRIx64 " size 0x%" PRIx64 " (table has %" PRIu32
              " regions)", gpa, size, mem->nregions);
    return -1;
}

int vb_mem_find_gpa(const vb_mem *mem, uint64_t gpa)
{
    uint32_t lo = 0, hi = mem->nregions;

    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        const vb_region *r = &mem->regions[mid];

        if (gpa < r->gpa) {
            hi = mid;
        } else if (gpa - r->gpa >= r->size) {
            lo = mid + 1;
        } else {
            return (int)mid;
        }
    }
    return -1;
}

void *vb_mem_gpa_to_host(const vb_mem *mem, uint64_t gpa, uint64_t len)
{
    int i = vb_mem_find_gpa(mem, gpa);
    const vb_region *r;
    uint64_t off;

    if (i < 0) {
        return NULL;
    }
    r = &mem->regions[i];
    off = gpa - r->gpa;
    if (len > r->size - off) {
        return NULL;
    }
    return r->host + off;
}

void *vb_mem_uaddr_to_host(const vb_mem *mem, uint64_t uaddr, uint64_t len)
{
    uint32_t i;

    for (i = 0; i < mem->nregions; i++) {
        const vb_region *r = &mem->regions[i];

        if (uaddr >= r->uaddr && uaddr - r->uaddr < r->size) {
            uint64_t off = uaddr - r->uaddr;

            return len <= r->size - off ? r->host + off : NULL;
        }
    }
    return NULL;
}

/* ---- the ballooned bitmap, by ranges ------------------------------------ */

/* Mask of bits [lo, hi) of one word, 0 <= lo < hi <= 64. */
static inline uint64_t word_mask(uint64_t lo, uint64_t hi)
{
    uint64_t m = hi - lo == 64 ? ~(uint64_t)0 : (((uint64_t)1 << (hi - lo)) - 1);

    return m << lo;
}

/* Pages of bm in [p, end) that are set. */
static uint64_t count_set(const uint64_t *bm, uint64_t p, uint64_t end)
{
    uint64_t count = 0;

    while (p < end) {
        uint64_t bit = p % 64, take = 64 - bit < end - p ? 64 - bit : end - p;

        count += (uint64_t)__builtin_popcountll(bm[p / 64] & word_mask(bit, bit + take));
        p += take;
    }
    return count;
}

/* Index of the first region starting after gpa (regions are sorted), or
 * nregions: where pages outside guest memory end. */
static uint64_t next_region_start(const vb_mem *mem, uint64_t gpa, uint64_t end)
{
    for (uint32_t i = 0; i < mem->nregions; i++) {
        if (mem->regions[i].gpa > gpa) {
            return mem->regions[i].gpa < end ? mem->regions[i].gpa : end;
        }
    }
    return end;
}

/* Appends a run of flipped pages to changed[], continuing the last range
 * when it goes on from it within the same region (not fresh). */
static void emit(vb_range *changed, uint32_t *nc, uint64_t gpa, uint64_t len, int *fresh)
{
    if (changed == NULL) {
        return;
    }
    if (!*fresh && *nc > 0 && changed[*nc - 1].gpa + changed[*nc - 1].len == gpa) {
        changed[*nc - 1].len += len;   /* the same run of pages, continued */
        return;
    }
    changed[(*nc)++] = (vb_range){gpa, len};
    *fresh = 0;
}

/* Pages [p, end) of region r: flip those not in the wanted state, count the
 * others; the flipped ones go to changed[] in ascending order. */
static void update_segment(vb_region *r, uint64_t p, uint64_t end, int inflate,
                           vb_range *changed, uint32_t *nc, vb_update *st)
{
    int fresh = 1;

    while (p < end) {
        uint64_t bit = p % 64, take = 64 - bit < end - p ? 64 - bit : end - p;
        uint64_t mask = word_mask(bit, bit + take);
        uint64_t *word = &r->ballooned[p / 64];
        uint64_t same = (inflate ? *word : ~*word) & mask;   /* already in that state */
        uint64_t flip = mask & ~same;

        if (same != 0) {
            if (st->unchanged_pages == 0) {
                st->first_unchanged_gpa = r->gpa + ((p - bit + (uint64_t)__builtin_ctzll(same)) << VB_PAGE_SHIFT);
            }
            st->unchanged_pages += (uint64_t)__builtin_popcountll(same);
        }
        if (flip != 0) {
            uint64_t n = (uint64_t)__builtin_popcountll(flip);

            *word = inflate ? *word | flip : *word & ~flip;
            if (inflate) {
                r->ballooned_pages += n;
            } else {
                r->ballooned_pages -= n;
            }
            st->changed_pages += n;
            /* The runs of flipped bits, as ranges. */
            while (flip != 0) {
                uint64_t lo = (uint64_t)__builtin_ctzll(flip);
                uint64_t rest = ~(flip >> lo);   /* zeros shifted in above: ones here */
                uint64_t run = rest == 0 ? 64 : (uint64_t)__builtin_ctzll(rest);

                emit(changed, nc, r->gpa + ((p - bit + lo) << VB_PAGE_SHIFT), run << VB_PAGE_SHIFT, &fresh);
                flip &= ~word_mask(lo, lo + run);
            }
        }
        p += take;
    }
}

int vb_balloon_update(vb_mem *mem, const vb_range *in, uint32_t n, int inflate, int whole,
                      vb_range *changed, uint32_t max_changed, vb_update *st)
{
    uint32_t nc = 0;
    vb_region *r = NULL;    /* last region hit: balloon batches are mostly local */

    memset(st, 0, sizeof(*st));
    if (changed != NULL) {
        uint64_t need = 0;

        for (uint32_t k = 0; k < n && need <= max_changed; k++) {
            need += whole ? 1 : in[k].len >> VB_PAGE_SHIFT;
        }
        if (need > max_changed) {
            return -1;
        }
    }
    for (uint32_t k = 0; k < n; k++) {
        uint64_t gpa = in[k].gpa & ~(VB_PAGE_SIZE - 1);
        uint64_t end = in[k].gpa + in[k].len < in[k].gpa ? UINT64_MAX & ~(VB_PAGE_SIZE - 1) : in[k].gpa + in[k].len;

        if (whole && inflate) {
            int i = vb_mem_region_of(mem, in[k].gpa, in[k].len);

            if (i >= 0 && count_set(mem->regions[i].ballooned, (in[k].gpa - mem->regions[i].gpa) >> VB_PAGE_SHIFT,
                                    (in[k].gpa + in[k].len - mem->regions[i].gpa) >> VB_PAGE_SHIFT) != 0) {
                if (st->refused++ == 0) {
                    st->first_refused_gpa = in[k].gpa;
                    st->first_refused_len = in[k].len;
                }
                continue;   /* inflating what is ballooned already: a confused guest */
            }
        }
        while (gpa < end) {
            uint64_t seg_end, p0, p1;

            if (r == NULL || gpa < r->gpa || gpa - r->gpa >= r->size) {
                int i = vb_mem_find_gpa(mem, gpa);

                if (i < 0) {
                    uint64_t stop = next_region_start(mem, gpa, end);

                    if (st->invalid_pages == 0) {
                        st->first_invalid_gpa = gpa;
                    }
                    st->invalid_pages += (stop - gpa + VB_PAGE_SIZE - 1) >> VB_PAGE_SHIFT;
                    gpa = stop;
                    r = NULL;
                    continue;
                }
                r = &mem->regions[i];
            }
            seg_end = end - r->gpa > r->size ? r->gpa + r->size : end;
            p0 = (gpa - r->gpa) >> VB_PAGE_SHIFT;
            p1 = (seg_end - r->gpa + VB_PAGE_SIZE - 1) >> VB_PAGE_SHIFT;
            update_segment(r, p0, p1, inflate, changed, &nc, st);
            gpa = seg_end;
        }
    }
    st->n_changed = nc;
    return (int)nc;
}

int vb_mem_region_of(const vb_mem *mem, uint64_t gpa, uint64_t len)
{
    int i = vb_mem_find_gpa(mem, gpa);

    if (i < 0 || len == 0 || len > mem->regions[i].size - (gpa - mem->regions[i].gpa)) {
        return -1;
    }
    return i;
}

int64_t vb_mem_ballooned_in_range(const vb_mem *mem, uint64_t gpa, uint64_t len)
{
    int i;
    const vb_region *r;
    uint64_t page, end, count = 0;

    if ((gpa | len) & (VB_PAGE_SIZE - 1)) {
        return -1;
    }
    i = vb_mem_region_of(mem, gpa, len);
    if (i < 0) {
        return -1;
    }
    r = &mem->regions[i];
    page = (gpa - r->gpa) >> VB_PAGE_SHIFT;
    end = page + (len >> VB_PAGE_SHIFT);
    /* Whole words where possible: a reported 2 MiB range is 8 of them. */
    while (page < end) {
        uint64_t word = r->ballooned[page / 64];
        uint64_t bit = page % 64;
        uint64_t take = 64 - bit < end - page ? 64 - bit : end - page;
        uint64_t mask = take == 64 ? ~(uint64_t)0 : (((uint64_t)1 << take) - 1) << bit;

        count += (uint64_t)__builtin_popcountll(word & mask);
        page += take;
    }
    return (int64_t)count;
}

/* Bytes the kernel holds for the files behind the regions (each file once),
 * as GuestMemory.allocated_bytes() counts them. */
uint64_t vb_mem_allocated_bytes(const vb_mem *mem)
{
    dev_t devs[VB_MAX_MEM_REGIONS];
    ino_t inos[VB_MAX_MEM_REGIONS];
    uint32_t seen = 0;
    uint64_t total = 0;

    for (uint32_t i = 0; i < mem->nregions; i++) {
        struct stat st;
        uint32_t j;

        if (fstat(mem->regions[i].fd, &st) < 0) {
            continue;
        }
        for (j = 0; j < seen; j++) {
            if (devs[j] == st.st_dev && inos[j] == st.st_ino) {
                break;
            }
        }
        if (j < seen) {
            continue;
        }
        devs[seen] = st.st_dev;
        inos[seen] = st.st_ino;
        seen++;
        total += (uint64_t)st.st_blocks * 512;
    }
    return total;
}
