/*
 * Discard engine: gives ballooned guest pages back to the host.
 *
 * Guest RAM is a shared file mapping (memfd/shmem, hugetlbfs, or a regular
 * file), so the only calls that free it are the ones that punch a hole in
 * the file: fallocate(PUNCH_HOLE) on the fd, or madvise(MADV_REMOVE) on our
 * mapping (which the kernel turns into the same punch on the mapped file).
 * MADV_DONTNEED is never used: on a MAP_SHARED mapping it only drops our
 * own page-table entries and the page cache keeps every page.
 *
 * Runs in a worker thread while the event loop uses the virtqueues; it only
 * writes the per-region discard_method/discard_errno fields and the
 * huge_cut bitmap (which nothing else reads while a discard may run).
 * Uses mem.c only.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "vb_internal.h"

/* ---- freeing ------------------------------------------------------------ */

static void stats_init(vb_discard_stats *st)
{
    memset(st, 0, sizeof(*st));
    st->failed_region = -1;
}

static void note_failure(vb_discard_stats *st, int region, int e, uint64_t len)
{
    st->bytes_failed += len;
    st->last_errno = e;
    st->failed_region = region;
}

static int punch_fallocate(const vb_region *r, uint64_t off, uint64_t len, vb_discard_stats *st)
{
    int rc;

    do {
        st->syscalls++;
        rc = fallocate(r->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                       (off_t)(r->mmap_offset + off), (off_t)len);
    } while (rc < 0 && errno == EINTR);
    return rc;
}

static int punch_madvise(const vb_region *r, uint64_t off, uint64_t len, vb_discard_stats *st)
{
    int rc;

    do {
        st->syscalls++;
        rc = madvise(r->host + off, (size_t)len, MADV_REMOVE);
    } while (rc < 0 && errno == EINTR);
    return rc;
}

/* Huge page size that decides what a punch into region r does, 0 if none:
 * hugetlbfs always has one (f_bsize, or the configured granule); shmem only
 * where a THP may back it (vb_track_configure). */
static uint64_t punch_granule(const vb_region *r)
{
    if (r->backing == VB_BACKING_HUGETLBFS) {
        return r->granule > VB_PAGE_SIZE ? r->granule : r->fs_block;
    }
    if (r->thp && r->granule > VB_PAGE_SIZE) {
        return r->granule;
    }
    return 0;
}

/* Counts a partial punch into huge page `huge` (file offset / g) of a
 * THP-possible region as a split the first time only: once split, later
 * punches into it split nothing.  Freeing it whole forgets that. */
static void note_cut(vb_region *r, uint64_t huge, vb_discard_stats *st)
{
    uint64_t h = huge - r->huge_first;

    if (r->huge_cut == NULL || h >= r->nhuge) {
        st->huge_split++;       /* not tracked: count every time */
        return;
    }
    if (!(r->huge_cut[h / 64] & ((uint64_t)1 << (h % 64)))) {
        r->huge_cut[h / 64] |= (uint64_t)1 << (h % 64);
        st->huge_split++;
    }
}

static void forget_cuts(vb_region *r, uint64_t first_huge, uint64_t end_huge)
{
    if (r->huge_cut == NULL) {
        return;
    }
    for (uint64_t h = first_huge; h < end_huge; h++) {
        uint64_t i = h - r->huge_first;

        if (i < r->nhuge) {
            r->huge_cut[i / 64] &= ~((uint64_t)1 << (i % 64));
        }
    }
}

/* Accounts a freed range [off, off+len) of region r by backing kind and by
 * huge pages (file offsets): whole ones, and those punched only in part. */
static void classify(vb_region *r, uint64_t off, uint64_t len, vb_discard_stats *st)
{
    uint64_t g = punch_granule(r);
    uint64_t a, b, first_whole, end_whole, whole;

    switch (r->backing) {
    case VB_BACKING_SHMEM:
        st->bytes_shmem += len;
        break;
    case VB_BACKING_HUGETLBFS:
        st->bytes_hugetlbfs += len;
        break;
    default:
        st->bytes_file += len;
        break;
    }
    if (g <= VB_PAGE_SIZE || (g & (g - 1)) != 0) {
        return;
    }
    a = r->mmap_offset + off;
    b = a + len;
    first_whole = (a + g - 1) & ~(g - 1);
    end_whole = b & ~(g - 1);
    whole = end_whole > first_whole ? (end_whole - first_whole) / g : 0;
    st->huge_whole += whole;
    if (r->backing == VB_BACKING_HUGETLBFS) {
        st->hugetlb_partial_bytes += len - whole * g;
        return;
    }
    if (whole) {
        forget_cuts(r, first_whole / g, end_whole / g);
    }
    /* The huge page holding a, and the one holding b - 1, are cut when the
     * range does not start (end) on a boundary; they may be the same one. */
    if ((a & (g - 1)) != 0) {
        note_cut(r, a / g, st);
    }
    if ((b & (g - 1)) != 0) {
        note_cut(r, (b - 1) / g, st);
    }
}

/*
 * Frees [off, off+len) of region idx.  The first call per region finds out
 * which method works (fallocate first: it needs no mapping and works on
 * every shmem and hugetlbfs file; MADV_REMOVE covers fds that refuse
 * fallocate but whose mapping is shmem, e.g. a MAP_SHARED /dev/zero).  When
 * both fail the region is marked and its later ranges cost no syscall.
 */
static int free_range(vb_mem *mem, int idx, uint64_t off, uint64_t len, vb_discard_stats *st)
{
    vb_region *r = &mem->regions[idx];
    int e;

    st->ranges++;
    if (r->discard_errno != 0) {
        note_failure(st, idx, r->discard_errno, len);
        return -1;
    }
    if (r->discard_method != VB_DISCARD_MADVISE) {
        if (punch_fallocate(r, off, len, st) == 0) {
            r->discard_method = VB_DISCARD_FALLOCATE;
            st->bytes_freed += len;
            classify(r, off, len, st);
            return 0;
        }
    }
    if (punch_madvise(r, off, len, st) == 0) {
        r->discard_method = VB_DISCARD_MADVISE;
        st->bytes_freed += len;
        classify(r, off, len, st);
        return 0;
    }
    e = errno;
    r->discard_errno = e;
    note_failure(st, idx, e, len);
    return -1;
}

/* One range of vb_discard_ranges; st accumulates. */
static int discard_one_range(vb_mem *mem, uint64_t gpa, uint64_t len, vb_discard_stats *st)
{
    int idx;
    const vb_region *r;

    if (len == 0) {
        return 0;
    }
    if ((gpa | len) & (VB_PAGE_SIZE - 1)) {
        note_failure(st, -1, EINVAL, len);
        return -1;
    }
    idx = vb_mem_find_gpa(mem, gpa);
    if (idx < 0 || len > mem->regions[idx].size - (gpa - mem->regions[idx].gpa)) {
        st->pages_outside += len >> VB_PAGE_SHIFT;
        return -1;
    }
    r = &mem->regions[idx];
    return free_range(mem, idx, gpa - r->gpa, len, st);
}

static int discard_ranges_now(vb_mem *mem, const vb_range *ranges, uint32_t n, vb_discard_stats *st);

/* Fault injection (scripts/faults/slow_discard.py): every vb_discard_ranges
 * call sleeps this long first and, while recording, logs when it ran.  Off
 * (0, not recording) unless a test turns it on. */
#define FAULT_LOG_MAX 4096
static pthread_mutex_t fault_mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t fault_delay_ns;
static int fault_recording;
static uint32_t fault_n;
static uint64_t fault_start[FAULT_LOG_MAX], fault_end[FAULT_LOG_MAX], fault_bytes[FAULT_LOG_MAX];

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void vb_fault_discard(uint64_t delay_ns, int record)
{
    pthread_mutex_lock(&fault_mu);
    fault_delay_ns = delay_ns;
    fault_recording = record;
    fault_n = 0;
    pthread_mutex_unlock(&fault_mu);
}

uint32_t vb_fault_discard_log(uint64_t *start_ns, uint64_t *end_ns, uint64_t *bytes, uint32_t max)
{
    uint32_t n;

    pthread_mutex_lock(&fault_mu);
    n = fault_n < max ? fault_n : max;
    memcpy(start_ns, fault_start, n * sizeof(*start_ns));
    memcpy(end_ns, fault_end, n * sizeof(*end_ns));
    memcpy(bytes, fault_bytes, n * sizeof(*bytes));
    pthread_mutex_unlock(&fault_mu);
    return n;
}

int vb_discard_ranges(vb_mem *mem, const vb_range *ranges, uint32_t n, vb_discard_stats *st)
{
    int rc = 0;
    uint64_t delay, start = 0, total = 0;
    int recording;

    pthread_mutex_lock(&fault_mu);
    delay = fault_delay_ns;
    recording = fault_recording;
    pthread_mutex_unlock(&fault_mu);
    if (recording) {
        start = now_ns();
        for (uint32_t i = 0; i < n; i++) {
            total += ranges[i].len;
        }
    }
    if (delay) {
        struct timespec ts = {(time_t)(delay / 1000000000u), (long)(delay % 1000000000u)};

        while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
        }
    }
    rc = discard_ranges_now(mem, ranges, n, st);
    if (recording) {
        uint64_t end = now_ns();

        pthread_mutex_lock(&fault_mu);
        if (fault_n < FAULT_LOG_MAX) {
            fault_start[fault_n] = start;
            fault_end[fault_n] = end;
            fault_bytes[fault_n] = total;
            fault_n++;
        }
        pthread_mutex_unlock(&fault_mu);
    }
    return rc;
}

static int discard_ranges_now(vb_mem *mem, const vb_range *ranges, uint32_t n, vb_discard_stats *st)
{
    int rc = 0;

    stats_init(st);
    for (uint32_t i = 0; i < n; i++) {
        if (discard_one_range(mem, ranges[i].gpa, ranges[i].len, st) < 0) {
            rc = -1;
        }
    }
    return rc;
}
