/*
 * Guest memory table: the regions the front-end shares with us, mapped
 * MAP_SHARED so that what we read is what the guest wrote, plus the
 * per-page "ballooned" bitmap of each region.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vb_internal.h"

vb_mem *vb_mem_new(void)
{
    return calloc(1, sizeof(vb_mem));
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
    vb_track_release(r);
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
    if (mem->nregions >= VB_MAX_REGIONS) {
        vb_seterr(err, errlen,
                  "region gpa 0x%" PRIx64 " size 0x%" PRIx64 ": memory table full (%d regions)",
                  gpa, size, VB_MAX_REGIONS);
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

/* ---- balloon page tracking --------------------------------------------- */

uint32_t vb_balloon_update(vb_mem *mem, const uint32_t *pfns, uint32_t n, int inflate,
                           uint32_t *changed, uint32_t *n_invalid,
                           uint32_t *first_invalid, uint32_t *n_unchanged)
{
    uint32_t k, nchanged = 0, ninvalid = 0, nunchanged = 0;
    vb_region *r = NULL;    /* last region hit: balloon batches are mostly local */

    *first_invalid = 0;
    for (k = 0; k < n; k++) {
        uint32_t pfn = pfns[k];
        uint64_t gpa = (uint64_t)pfn << VB_PAGE_SHIFT;
        uint64_t page, mask;
        uint64_t *word;

        if (r == NULL || gpa < r->gpa || gpa - r->gpa >= r->size) {
            int i = vb_mem_find_gpa(mem, gpa);

            if (i < 0) {
                if (ninvalid++ == 0) {
                    *first_invalid = pfn;
                }
                continue;
            }
            r = &mem->regions[i];
        }
        page = (gpa - r->gpa) >> VB_PAGE_SHIFT;
        word = &r->ballooned[page / 64];
        mask = (uint64_t)1 << (page % 64);
        if (inflate ? (*word & mask) : !(*word & mask)) {
            nunchanged++;
            continue;
        }
        if (inflate) {
            *word |= mask;
            r->ballooned_pages++;
        } else {
            *word &= ~mask;
            r->ballooned_pages--;
        }
        changed[nchanged++] = pfn;
    }
    *n_invalid = ninvalid;
    *n_unchanged = nunchanged;
    return nchanged;
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
    dev_t devs[VB_MAX_REGIONS];
    ino_t inos[VB_MAX_REGIONS];
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
