/*
 * vhostballoon native core: guest memory table, split rings, one sink per
 * buffer format (popped buffers -> ranges of guest addresses), the
 * ballooned bitmap, the huge page tracker, the discard engine and the page
 * journal, all on ranges.  It knows nothing of vhost-user and nothing of
 * threads or sockets (that is the runtime: vb_runtime.h).
 *
 * Plain C, no Python headers.  Every guest address is checked against the
 * memory table before it is dereferenced.  Functions that can fail return
 * a negative value and write a human-readable reason, naming the offending
 * values, into err[errlen].
 *
 * The part between the CDEF markers is also the cffi cdef
 * (csrc/build_native.py), so it has no preprocessor lines; the sizes it
 * uses come from vb_gen.h, generated from the Python sources at build time.
 */
#ifndef VB_CORE_H
#define VB_CORE_H

#include <stddef.h>
#include <stdint.h>

#include "vb_gen.h"

/* CDEF-BEGIN */

/* A region of guest RAM shared by the front-end (vhost-user memory region). */
typedef struct vb_region {
    uint64_t gpa;           /* guest physical start */
    uint64_t size;          /* bytes */
    uint64_t uaddr;         /* front-end's virtual address (vring addresses use it) */
    uint64_t mmap_offset;   /* offset of gpa in fd */
    int fd;                 /* owned by the table once added */
    uint8_t *host;          /* our MAP_SHARED mapping of [mmap_offset, +size) */
    uint64_t *ballooned;    /* bitmap: one bit per 4 KiB page of the region */
    uint64_t ballooned_pages;
    int discard_errno;      /* != 0: neither fallocate nor madvise frees this region */
    int discard_method;     /* 0 not tried yet, 1 fallocate, 2 madvise(MADV_REMOVE) */

    /* Huge page tracking (vb_track_*, below).  Huge pages are counted by
     * file offset: huge page h covers fd offsets [h * granule, (h+1) * granule). */
    int backing;            /* VB_BACKING_*: fstatfs of fd at vb_mem_add (or vb_track_configure) */
    uint64_t fs_block;      /* f_bsize from that fstatfs (the huge page size on hugetlbfs) */
    int thp;                /* a partial punch may split a transparent huge page here */
    int track_configured;   /* vb_track_configure has run for this region */
    uint64_t granule;       /* tracked huge page size; 4096: pages are freed as they come */
    uint64_t huge_first;    /* mmap_offset / granule: the first huge page the region touches */
    uint64_t nhuge;         /* huge pages the region touches, wholly or in part */
    uint32_t *huge_ballooned; /* per huge page: its pages the tracker counts as ballooned */
    uint32_t *huge_pending;   /* per huge page: its pending pages */
    uint64_t *tracked;      /* bitmap per 4 KiB page: counted in huge_ballooned */
    uint64_t *pending;      /* bitmap per 4 KiB page: ballooned, not handed out to be freed yet */
    uint64_t pending_pages;
    uint64_t pending_since_ns; /* CLOCK_MONOTONIC when pending_pages last went 0 -> >0; 0 if none */
    uint64_t *huge_cut;     /* bitmap per huge page: punched in part since it was last freed
                             * whole (the discard engine's; a THP splits only once) */
} vb_region;

typedef struct vb_mem {
    uint32_t nregions;
    vb_region regions[VB_MAX_MEM_REGIONS];   /* vhost_user/constants.py MAX_MEM_SLOTS */
} vb_mem;

/* Split virtqueue state (virtio 1.x, 2.7).  Pointers are into guest RAM. */
typedef struct vb_vq {
    uint32_t num;
    void *desc;             /* struct vring_desc[num] */
    void *avail;            /* struct vring_avail + ring[num] + used_event */
    void *used;             /* struct vring_used + ring[num] + avail_event */
    uint16_t last_avail_idx;
    uint16_t used_idx;
    uint16_t signalled_used;
    int signalled_used_valid;
    int event_idx;          /* VIRTIO_RING_F_EVENT_IDX negotiated */
    int indirect;           /* VIRTIO_RING_F_INDIRECT_DESC negotiated */
    int ready;              /* setup succeeded */
} vb_vq;

typedef struct vb_discard_stats {
    uint64_t bytes_freed;   /* bytes in ranges the kernel accepted */
    uint64_t bytes_failed;  /* bytes in ranges that could not be freed */
    uint64_t ranges;        /* coalesced ranges attempted */
    uint64_t syscalls;      /* fallocate + madvise calls issued */
    uint64_t pages_outside; /* pages of ranges that lie in no one region (refused) */
    int last_errno;         /* errno of the last failure, 0 if none */
    int failed_region;      /* index of the region that failed, -1 if none */
    /* What the freed ranges were, by the region's huge page size (file
     * offsets; see vb_track_configure).  Counted for ranges the kernel accepted. */
    uint64_t huge_whole;    /* whole huge pages freed (THP-possible shmem and hugetlbfs) */
    uint64_t huge_split;    /* huge pages of THP-possible shmem first punched in part (not
                             * again until freed whole): each split that huge page if it
                             * was a THP at that moment */
    uint64_t hugetlb_partial_bytes; /* hugetlbfs bytes outside whole huge pages: the kernel
                             * accepts the punch but only zeroes them and frees nothing */
    uint64_t bytes_shmem;   /* bytes_freed by backing kind */
    uint64_t bytes_hugetlbfs;
    uint64_t bytes_file;
} vb_discard_stats;

/* A guest-physical byte range, 4 KiB aligned, inside one region. */
typedef struct vb_range {
    uint64_t gpa;
    uint64_t len;
} vb_range;

/* One descriptor of a popped buffer, as the driver wrote it
 * (vb_vq_pop_ranges): for free page reporting the descriptors ARE the
 * free ranges; for statistics they point at the stats array. */
typedef struct vb_desc_range {
    uint64_t addr;          /* guest physical address, not checked by the walker */
    uint32_t len;
    uint16_t flags;         /* VRING_DESC_F_* as written (NEXT, WRITE) */
} vb_desc_range;

/* vb_region.backing: what fstatfs says the region's fd lives on. */
enum {
    VB_BACKING_FILE = 0,        /* anything else: no huge pages we know of */
    VB_BACKING_SHMEM = 1,       /* TMPFS_MAGIC: memfd, tmpfs, shared anonymous */
    VB_BACKING_HUGETLBFS = 2    /* HUGETLBFS_MAGIC: every page is a huge page */
};

/* ---- guest memory table ------------------------------------------------ */
vb_mem *vb_mem_new(void);
void vb_mem_free(vb_mem *mem);              /* unmaps, closes fds, frees bitmaps */
void vb_mem_clear(vb_mem *mem);             /* same, but keeps the table */
/* Validates (size > 0, 4 KiB alignment of gpa/size/mmap_offset, no overflow of
 * gpa+size, uaddr+size or mmap_offset+size, no gpa or uaddr overlap with an
 * existing region, at most VB_MAX_MEM_REGIONS), mmaps the fd MAP_SHARED read/write.
 * On success the table owns fd; on failure fd is left open for the caller. */
int vb_mem_add(vb_mem *mem, int fd, uint64_t gpa, uint64_t size,
               uint64_t uaddr, uint64_t mmap_offset, char *err, size_t errlen);
/* Removes the region with exactly this gpa and size: unmaps, closes its fd. */
int vb_mem_remove(vb_mem *mem, uint64_t gpa, uint64_t size, char *err, size_t errlen);
/* Host pointer for [gpa, gpa+len) if it lies wholly in one region, else NULL. */
void *vb_mem_gpa_to_host(const vb_mem *mem, uint64_t gpa, uint64_t len);
void *vb_mem_uaddr_to_host(const vb_mem *mem, uint64_t uaddr, uint64_t len);

/* ---- virtqueue --------------------------------------------------------- */
/* Translates the ring addresses (front-end virtual addresses, as in
 * SET_VRING_ADDR) and checks that each whole ring lies in guest memory.
 * num must be a power of two <= 32768.  base becomes last_avail_idx and
 * used_idx.  Call again after the memory table changes. */
int vb_vq_setup(vb_vq *vq, const vb_mem *mem, uint32_t num,
                uint64_t desc_uaddr, uint64_t avail_uaddr, uint64_t used_uaddr,
                uint16_t base, int event_idx, int indirect,
                char *err, size_t errlen);
/* ---- sinks: popped buffers -> ranges of guest addresses -------------------
 * One sink per buffer format (vhostballoon/device/queues.py BufferFormat).
 * Each pops every available buffer (up to max_heads, and only whole buffers
 * whose items fit in max_items; a buffer of more than max_items items is
 * malformed) and turns it into ranges, in the buffers' order:
 *
 * - vb_vq_pop_pfn32: device-readable arrays of le32 PFNs (4 KiB pages, virtio
 *   1.x 5.5.6); items are PFNs.  Consecutive ascending PFNs of one buffer
 *   become one range (split where a region ends), so the ranges, page by
 *   page, are the PFNs in the order the guest wrote them, duplicates and
 *   PFNs outside guest memory included: the bitmap update counts those.
 * - vb_vq_pop_extents: each device-readable descriptor's own address and
 *   length is one range (as free page reporting buffers are); items are
 *   descriptors.  Each range is checked for inflate/deflate use: 4 KiB
 *   aligned, non-empty, not wrapping, inside one region, not overlapping
 *   another range of the same buffer.  A range that fails is refused: not
 *   written to ranges[], counted in batch->refused, the first one's values
 *   and reason kept; its buffer still pops (and goes back with used len 0).
 *
 * ranges[] must hold max_items.  Returns the number of buffers popped (0:
 * none available), or -1 when the ring is malformed (head out of range,
 * avail index moved by more than num, chain loop or longer than num,
 * descriptor outside guest memory, PFN array length not a multiple of 4, a
 * device-writable descriptor, bad indirect table, a buffer larger than
 * max_items): nothing is consumed then, and err says what and which values.
 * With event_idx it also publishes avail_event = last_avail_idx. */
enum {
    VB_REFUSE_NONE = 0,
    VB_REFUSE_EMPTY = 1,        /* length 0 */
    VB_REFUSE_UNALIGNED = 2,    /* address or length not a multiple of 4 KiB */
    VB_REFUSE_WRAPS = 3,        /* address + length wraps around 2^64 */
    VB_REFUSE_OUTSIDE = 4,      /* not inside one region of guest memory */
    VB_REFUSE_OVERLAP = 5,      /* overlaps an earlier range of the same buffer */
    VB_REFUSE_BALLOONED = 6     /* inflate of a range already (partly) in the balloon (vb_balloon_update) */
};

typedef struct vb_batch {
    uint32_t n_ranges;          /* ranges written */
    uint64_t items;             /* PFNs or descriptors in the buffers popped */
    uint64_t refused;           /* ranges refused (extents) */
    uint64_t first_refused_gpa; /* the first refused range, as the guest wrote it */
    uint64_t first_refused_len;
    int first_refused_why;      /* VB_REFUSE_* */
} vb_batch;

int vb_vq_pop_pfn32(vb_vq *vq, const vb_mem *mem, vb_range *ranges, uint32_t max_items,
                    vb_batch *batch, uint16_t *heads, uint32_t max_heads, char *err, size_t errlen);
int vb_vq_pop_extents(vb_vq *vq, const vb_mem *mem, vb_range *ranges, uint32_t max_items,
                      vb_batch *batch, uint16_t *heads, uint32_t max_heads, char *err, size_t errlen);
/* Same walk and guards, but returns the descriptors themselves, unchecked,
 * for the queues Python serves (reporting, statistics): ranges[] gets every
 * buffer's descriptors in order, counts[i] how many belong to buffer i
 * (heads[i]).  Every descriptor must be device-writable (writable=1) or
 * device-readable (writable=0), else the ring is malformed. */
int vb_vq_pop_ranges(vb_vq *vq, const vb_mem *mem, int writable,
                     vb_desc_range *ranges, uint32_t max_ranges, uint32_t *n_ranges,
                     uint16_t *heads, uint32_t *counts, uint32_t max_heads,
                     char *err, size_t errlen);
/* Adds n used elements (id heads[i], len lens[i] or 0 when lens is NULL),
 * then publishes used->idx after a write barrier. */
void vb_vq_push_used(vb_vq *vq, const uint16_t *heads, const uint32_t *lens, uint32_t n);
/* 1 if the driver wants an interrupt for what was pushed since the last
 * signal (VRING_AVAIL_F_NO_INTERRUPT, or used_event with EVENT_IDX). */
int vb_vq_should_signal(vb_vq *vq);
/* Number of available buffers not yet popped, or -1 if avail idx is bogus. */
int vb_vq_pending(const vb_vq *vq);

/* ---- ranges and the ballooned bitmap ------------------------------------ */
/* PFNs as ranges, as the PFN32 sink makes them: runs of consecutive pages,
 * ascending or descending, in input order (split where a region of mem
 * ends; mem may be NULL); every input page in exactly one range.  out[]
 * must hold n.  Returns the number of ranges. */
uint32_t vb_ranges_from_pfns(const vb_mem *mem, const uint32_t *pfns, uint32_t n, vb_range *out);
/* Sorts ranges by gpa and merges those that overlap or touch within one
 * region (or both outside guest memory).  Returns the new count. */
uint32_t vb_ranges_merge(const vb_mem *mem, vb_range *ranges, uint32_t n);

typedef struct vb_update {
    uint32_t n_changed;          /* ranges written to changed[] */
    uint64_t changed_pages;      /* pages whose state flipped */
    uint64_t invalid_pages;      /* pages outside every region (ignored) */
    uint64_t first_invalid_gpa;  /* the first of them in input order */
    uint64_t unchanged_pages;    /* pages already in that state (repeated) */
    uint64_t first_unchanged_gpa;
    uint64_t refused;            /* whole: inflate ranges refused (already partly ballooned) */
    uint64_t first_refused_gpa;
    uint64_t first_refused_len;
} vb_update;

/* Applies an inflate (inflate=1) or deflate (0) of ranges (4 KiB aligned;
 * each may cross regions or lie outside them) to the ballooned bitmap,
 * page by page in input order: a page outside guest memory is invalid, a
 * page already in that state is unchanged.  whole=1 (extents): an inflate
 * range with any page already ballooned is refused as a whole (nothing of
 * it changes).  changed[] (may be NULL) receives the pages that flipped as
 * ranges in input order; it must hold as many ranges as the input has pages
 * (whole=1: as many as the input has ranges).  Returns n_changed, or -1
 * when changed[] is too small (nothing done). */
int vb_balloon_update(vb_mem *mem, const vb_range *in, uint32_t n, int inflate, int whole,
                      vb_range *changed, uint32_t max_changed, vb_update *st);

/* Bytes the kernel holds for the files behind the regions: st_blocks * 512
 * summed over the distinct files (two regions in one memfd count once). */
uint64_t vb_mem_allocated_bytes(const vb_mem *mem);
/* Index of the region holding all of [gpa, gpa+len) (len > 0), or -1. */
int vb_mem_region_of(const vb_mem *mem, uint64_t gpa, uint64_t len);
/* Ballooned pages in [gpa, gpa+len): 4 KiB aligned, inside one region;
 * -1 when it is not. */
int64_t vb_mem_ballooned_in_range(const vb_mem *mem, uint64_t gpa, uint64_t len);

/* ---- discard engine ---------------------------------------------------- */
/* Frees each range (ranges are not merged or sorted here) with
 * fallocate(PUNCH_HOLE|KEEP_SIZE) on the region's fd at mmap_offset +
 * (gpa - region gpa), falling back to madvise(MADV_REMOVE) on our mapping;
 * a region where both fail is marked (discard_errno) and skipped from then
 * on.  Classifies each freed range in st (huge_whole, huge_split, ...).  A
 * range that is not 4 KiB aligned or not inside one region is refused
 * (counted in bytes_failed / pages_outside) and the others still run.
 * Blocking: call it off the event loop. */
int vb_discard_ranges(vb_mem *mem, const vb_range *ranges, uint32_t n, vb_discard_stats *st);

/* ---- huge page tracking -------------------------------------------------
 * Frees ballooned memory in whole huge pages whatever order the guest's
 * 4 KiB pages arrive in.  Per region and per huge page (by file offset) the
 * tracker counts ballooned pages; a huge page whose every page is ballooned
 * is handed out as one range; the other ballooned pages stay "pending"
 * until a policy collects them (vhostballoon/device/hugepages.py).  A huge
 * page only partly inside its region (mmap_offset not huge-aligned) is
 * never whole: its pages can be freed only as pending ones.
 *
 * Invariant, whatever the caller passes: every range handed out by
 * vb_track_inflate or vb_track_collect consists of pages that are
 * ballooned in the region's bitmap at that moment.  The caller must free
 * the ranges before it next calls vb_track_deflate / vb_balloon_update
 * (deflate is sacred: a page the guest took back must never be freed).
 *
 * Threads: none of these may run concurrently with each other, with
 * vb_balloon_update or with a table change; vb_discard_ranges may run in
 * another thread only while the caller keeps all of them from running
 * (the server holds its memory lock across the worker thread). */

/* f_type of fstatfs(fd) as a VB_BACKING_* value (-1 and errno if fstatfs
 * fails); *block gets f_bsize. */
int vb_fd_backing(int fd, uint64_t *block);
/* Sets how region `region` is tracked: granule (power of two, 4 KiB to
 * 1 GiB; 4096 means "no huge pages": every ballooned page is handed out at
 * once), its backing kind and whether partial punches can split a THP
 * there.  Refused while the region has pending pages.  Pages ballooned
 * before the call count as ballooned and already freed. */
int vb_track_configure(vb_mem *mem, uint32_t region, uint64_t granule, int backing, int thp,
                       char *err, size_t errlen);
/* For ranges whose pages just became ballooned (vb_balloon_update's
 * changed[]): counts their pages per huge page and writes to ranges[] the
 * huge pages that became wholly ballooned (merged when adjacent; a range
 * covering whole huge pages frees them as they are, never split), then the
 * pages of regions whose granule is 4 KiB (coalesced).  The rest become
 * pending.  Pages outside guest memory, not ballooned in the bitmap, or
 * already counted are ignored.  max_ranges must be >= n; should a batch
 * complete more separate huge pages than that, the rest stay pending.
 * Returns the number of ranges, or -1 when max_ranges < n (nothing done). */
int vb_track_inflate(vb_mem *mem, const vb_range *in, uint32_t n,
                     vb_range *ranges, uint32_t max_ranges);
/* For ranges whose pages just left the balloon (a deflate's ranges, after
 * vb_balloon_update): uncounts them and drops them from pending.  Pages
 * still ballooned in the bitmap, or not counted, are ignored.  Returns how
 * many pending pages were dropped. */
uint64_t vb_track_deflate(vb_mem *mem, const vb_range *in, uint32_t n);
/* Takes pending pages of region `region` (-1: every region) as coalesced
 * ranges, at most max_ranges, and clears them.  hugetlbfs regions are
 * skipped: a partial punch there frees nothing, so their pages stay
 * pending until their huge page completes.  Returns the number of ranges. */
uint32_t vb_track_collect(vb_mem *mem, int region, vb_range *ranges, uint32_t max_ranges);
/* Pending pages over all regions; with collectable_only, only those
 * vb_track_collect would take.  *oldest_ns (may be NULL) gets the earliest
 * pending_since_ns of those regions (CLOCK_MONOTONIC), 0 if none pending. */
uint64_t vb_track_pending(const vb_mem *mem, int collectable_only, uint64_t *oldest_ns);
/* Plain shmem regions (no THP possible) tracked in 2 MiB blocks only to free
 * across buffers in large ranges: their partial blocks are freed under every
 * policy, at the target, when the inflate queue goes idle, or on a flush.
 * Pending pages of those regions, and collecting them alone (as
 * vb_track_collect; returns the number of ranges). */
uint64_t vb_track_pending_batch(const vb_mem *mem);
uint32_t vb_track_collect_batch(vb_mem *mem, vb_range *ranges, uint32_t max_ranges);
/* Pages in the balloon, all regions. */
uint64_t vb_mem_ballooned_pages(const vb_mem *mem);

/* ---- state export / import (persist.c) ---------------------------------
 * A region's ballooned bitmap and pending bitmap as raw words (bit p of
 * word p / 64 is region page p); nwords must be exactly the region's
 * bitmap size ((size / 4096 + 63) / 64).  The exports copy the bitmap and
 * return how many pages are set (-1: bad region or nwords).  The imports
 * are for a fresh region (after vb_mem_add and vb_track_configure, before
 * any balloon update): vb_mem_import_ballooned sets the bitmap and counts
 * the pages as ballooned and already freed (tracked, not pending);
 * vb_track_import_pending then marks pages pending, only those ballooned
 * and not pending yet, and restarts the pending clock.  They return the
 * pages set, or -1 with err. */
int64_t vb_mem_export_ballooned(const vb_mem *mem, uint32_t region, uint64_t *words, uint64_t nwords);
int64_t vb_track_export_pending(const vb_mem *mem, uint32_t region, uint64_t *words, uint64_t nwords);
int64_t vb_mem_import_ballooned(vb_mem *mem, uint32_t region, const uint64_t *words, uint64_t nwords,
                                char *err, size_t errlen);
int64_t vb_track_import_pending(vb_mem *mem, uint32_t region, const uint64_t *words, uint64_t nwords,
                                char *err, size_t errlen);

/* Fault injection, for scripts/faults/ only: every vb_discard_ranges call
 * first sleeps delay_ns and, with record, logs its CLOCK_MONOTONIC start and
 * end and its bytes (up to 4096 calls; the call clears the log).
 * vb_fault_discard_log copies at most max entries, returns how many. */
void vb_fault_discard(uint64_t delay_ns, int record);
uint32_t vb_fault_discard_log(uint64_t *start_ns, uint64_t *end_ns, uint64_t *bytes, uint32_t max);

/* ---- page journal (persist.c) --------------------------------------------
 * Records appended to a MAP_SHARED file mapping the caller owns (layout in
 * vhostballoon/server/persist.py).  Appends are serialised by the
 * journal's own mutex, so workers and the session may both append.
 * vb_journal_append returns 0, 1 when the journal is now more than half
 * full (time for a snapshot), -1 when the record does not fit (nothing
 * written).  vb_crc32 is zlib's crc32. */
typedef struct vb_journal vb_journal;
vb_journal *vb_journal_new(uint8_t *base, uint64_t size);
void vb_journal_free(vb_journal *j);
void vb_journal_rewind(vb_journal *j, uint64_t epoch);
uint64_t vb_journal_offset(vb_journal *j);
int vb_journal_append(vb_journal *j, uint32_t kind, const uint32_t *values, uint32_t count);
/* A record whose values are ranges: per range le64 gpa, le64 len (4 words). */
int vb_journal_append_ranges(vb_journal *j, uint32_t kind, const vb_range *ranges, uint32_t n);
uint32_t vb_crc32(uint32_t crc, const uint8_t *data, uint64_t len);

/* CDEF-END */

#endif
