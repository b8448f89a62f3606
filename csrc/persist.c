/*
 * Export and import of a region's balloon state, for the server's state
 * directory (vhostballoon/server/persist.py): the ballooned bitmap and the
 * huge page tracker's pending bitmap, as raw 64-bit words (one bit per
 * 4 KiB page of the region, bit p of word p / 64).
 *
 * Import is for a region that has just been added (nothing ballooned yet),
 * after vb_track_configure: it rebuilds the counts the other C files keep
 * (ballooned_pages, tracked, huge_ballooned, huge_pending, pending_pages)
 * so that the result is the state vb_balloon_update + vb_track_inflate
 * would have built.  It is separate from track.c and mem.c on purpose: it
 * only reads and writes the vb_region fields they document.
 *
 * Threads: as vb_balloon_update (vb_core.h): under the server's memory lock.
 * Uses mem.c only; the journal below uses nothing.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "vb_internal.h"

static inline uint64_t region_words(const vb_region *r)
{
    return ((r->size >> VB_PAGE_SHIFT) + 63) / 64;
}

/* The last word may hold bits past the region's end: never import those. */
static inline uint64_t last_word_mask(const vb_region *r)
{
    uint64_t tail = (r->size >> VB_PAGE_SHIFT) % 64;

    return tail == 0 ? ~(uint64_t)0 : ((uint64_t)1 << tail) - 1;
}

static inline uint64_t huge_index(const vb_region *r, uint64_t p)
{
    uint64_t ppg = r->granule >> VB_PAGE_SHIFT;

    return ((r->mmap_offset >> VB_PAGE_SHIFT) + p) / ppg - r->huge_first;
}

static int check_region(const vb_mem *mem, uint32_t region, uint64_t nwords,
                        char *err, size_t errlen)
{
    if (region >= mem->nregions) {
        vb_seterr(err, errlen, "region %" PRIu32 " out of range (table has %" PRIu32 " regions)",
                  region, mem->nregions);
        return -1;
    }
    if (nwords != region_words(&mem->regions[region])) {
        vb_seterr(err, errlen,
                  "region %" PRIu32 " of %" PRIu64 " bytes has a %" PRIu64 "-word bitmap, got %"
                  PRIu64 " words", region, mem->regions[region].size,
                  region_words(&mem->regions[region]), nwords);
        return -1;
    }
    return 0;
}

int64_t vb_mem_export_ballooned(const vb_mem *mem, uint32_t region, uint64_t *words, uint64_t nwords)
{
    const vb_region *r;

    if (check_region(mem, region, nwords, NULL, 0) < 0) {
        return -1;
    }
    r = &mem->regions[region];
    memcpy(words, r->ballooned, (size_t)nwords * sizeof(uint64_t));
    return (int64_t)r->ballooned_pages;
}

int64_t vb_track_export_pending(const vb_mem *mem, uint32_t region, uint64_t *words, uint64_t nwords)
{
    const vb_region *r;

    if (check_region(mem, region, nwords, NULL, 0) < 0) {
        return -1;
    }
    r = &mem->regions[region];
    if (r->pending == NULL) {
        memset(words, 0, (size_t)nwords * sizeof(uint64_t));
        return 0;
    }
    memcpy(words, r->pending, (size_t)nwords * sizeof(uint64_t));
    return (int64_t)r->pending_pages;
}

int64_t vb_mem_import_ballooned(vb_mem *mem, uint32_t region, const uint64_t *words, uint64_t nwords,
                                char *err, size_t errlen)
{
    vb_region *r;
    uint64_t count = 0;

    if (check_region(mem, region, nwords, err, errlen) < 0) {
        return -1;
    }
    r = &mem->regions[region];
    if (r->ballooned_pages != 0 || r->pending_pages != 0) {
        vb_seterr(err, errlen,
                  "region %" PRIu32 " already has %" PRIu64 " ballooned pages; import only into"
                  " a fresh region", region, r->ballooned_pages);
        return -1;
    }
    for (uint64_t w = 0; w < nwords; w++) {
        uint64_t bits = words[w] & (w == nwords - 1 ? last_word_mask(r) : ~(uint64_t)0);

        r->ballooned[w] = bits;
        count += (uint64_t)__builtin_popcountll(bits);
        if (r->tracked != NULL) {
            /* Counted by the tracker, not pending: freed already (as
             * vb_track_configure treats pages ballooned before it ran). */
            r->tracked[w] = bits;
            while (bits != 0) {
                uint64_t p = w * 64 + (uint64_t)__builtin_ctzll(bits);

                r->huge_ballooned[huge_index(r, p)]++;
                bits &= bits - 1;
            }
        }
    }
    r->ballooned_pages = count;
    return (int64_t)count;
}

int64_t vb_track_import_pending(vb_mem *mem, uint32_t region, const uint64_t *words, uint64_t nwords,
                                char *err, size_t errlen)
{
    vb_region *r;
    uint64_t added = 0;
    struct timespec ts;

    if (check_region(mem, region, nwords, err, errlen) < 0) {
        return -1;
    }
    r = &mem->regions[region];
    if (r->pending == NULL) {
        vb_seterr(err, errlen,
                  "region %" PRIu32 " has no huge page tracking (granule %" PRIu64 "): it cannot"
                  " hold pending pages", region, r->granule);
        return -1;
    }
    for (uint64_t w = 0; w < nwords; w++) {
        /* Only pages ballooned and counted, and not pending yet. */
        uint64_t bits = words[w] & r->ballooned[w] & r->tracked[w] & ~r->pending[w];

        if (w == nwords - 1) {
            bits &= last_word_mask(r);
        }
        r->pending[w] |= bits;
        while (bits != 0) {
            uint64_t p = w * 64 + (uint64_t)__builtin_ctzll(bits);

            r->huge_pending[huge_index(r, p)]++;
            added++;
            bits &= bits - 1;
        }
    }
    if (added != 0 && r->pending_pages == 0) {
        /* The deadline starts again: the old process's clock is gone. */
        clock_gettime(CLOCK_MONOTONIC, &ts);
        r->pending_since_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    }
    r->pending_pages += added;
    return (int64_t)added;
}

/* ---- the page journal ------------------------------------------------------
 * Appended by the C queue workers (before a batch's buffers go back to the
 * guest) and by the session (flushes, the guest's actual), so the append
 * lives here, under the journal's own mutex.  Record layout (little-endian,
 * as vhostballoon/server/persist.py reads it): le32 0x56420000 | kind,
 * le32 count, le64 epoch, count x le32, le32 CRC-32 (zlib's) of all before.
 * A record of ranges carries per range le64 gpa, le64 len (4 values).  The
 * kinds are the caller's (vhostballoon/device/journal_kinds.py). */
#include <pthread.h>

#define JOURNAL_MAGIC 0x56420000u
#define JOURNAL_HEADER 16u

struct vb_journal {
    pthread_mutex_t mu;
    uint8_t *base;      /* a MAP_SHARED file mapping, owned by the caller */
    uint64_t size;
    uint64_t offset;
    uint64_t epoch;
};

static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;

        for (int k = 0; k < 8; k++) {
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        }
        crc_table[n] = c;
    }
}

static uint32_t crc_update(uint32_t crc, const uint8_t *p, uint64_t n)
{
    crc = ~crc;
    while (n--) {
        crc = crc_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    }
    return ~crc;
}

uint32_t vb_crc32(uint32_t crc, const uint8_t *data, uint64_t len)
{
    pthread_once(&crc_once, crc_init);
    return crc_update(crc, data, len);
}

vb_journal *vb_journal_new(uint8_t *base, uint64_t size)
{
    vb_journal *j = calloc(1, sizeof(*j));

    if (j == NULL) {
        return NULL;
    }
    pthread_once(&crc_once, crc_init);
    pthread_mutex_init(&j->mu, NULL);
    j->base = base;
    j->size = size;
    return j;
}

void vb_journal_free(vb_journal *j)
{
    if (j != NULL) {
        pthread_mutex_destroy(&j->mu);
        free(j);
    }
}

void vb_journal_rewind(vb_journal *j, uint64_t epoch)
{
    pthread_mutex_lock(&j->mu);
    if (j->size >= JOURNAL_HEADER) {
        memset(j->base, 0, JOURNAL_HEADER);   /* the old first record no longer checks */
    }
    j->offset = 0;
    j->epoch = epoch;
    pthread_mutex_unlock(&j->mu);
}

uint64_t vb_journal_offset(vb_journal *j)
{
    uint64_t off;

    pthread_mutex_lock(&j->mu);
    off = j->offset;
    pthread_mutex_unlock(&j->mu);
    return off;
}

/* Appends a record of count le32 words, copied from values (count words)
 * or, with ranges != NULL, from count / 4 ranges. */
static int append(vb_journal *j, uint32_t kind, const uint32_t *values, const vb_range *ranges, uint32_t count)
{
    uint8_t header[JOURNAL_HEADER];
    uint32_t magic = JOURNAL_MAGIC | (kind & 0xFFFF), crc;
    uint64_t need = JOURNAL_HEADER + (uint64_t)count * 4 + 4, at;
    uint8_t *data;
    int rc;

    pthread_mutex_lock(&j->mu);
    at = j->offset;
    if (need > j->size - at || at > j->size) {
        pthread_mutex_unlock(&j->mu);
        return -1;
    }
    memcpy(header, &magic, 4);
    memcpy(header + 4, &count, 4);
    memcpy(header + 8, &j->epoch, 8);
    memcpy(j->base + at, header, JOURNAL_HEADER);
    data = j->base + at + JOURNAL_HEADER;
    if (ranges != NULL) {
        for (uint32_t k = 0; k < count / 4; k++) {
            uint64_t gpa = htole64(ranges[k].gpa), len = htole64(ranges[k].len);

            memcpy(data + 16 * (size_t)k, &gpa, 8);
            memcpy(data + 16 * (size_t)k + 8, &len, 8);
        }
    } else if (count) {
        memcpy(data, values, (size_t)count * 4);
    }
    crc = crc_update(0, j->base + at, JOURNAL_HEADER + (uint64_t)count * 4);
    memcpy(j->base + at + JOURNAL_HEADER + (uint64_t)count * 4, &crc, 4);
    j->offset = at + need;
    rc = j->offset * 2 > j->size ? 1 : 0;
    pthread_mutex_unlock(&j->mu);
    return rc;
}

int vb_journal_append(vb_journal *j, uint32_t kind, const uint32_t *values, uint32_t count)
{
    return append(j, kind, values, NULL, count);
}

int vb_journal_append_ranges(vb_journal *j, uint32_t kind, const vb_range *ranges, uint32_t n)
{
    if (n > UINT32_MAX / 4) {
        return -1;
    }
    return append(j, kind, NULL, ranges, 4 * n);
}
