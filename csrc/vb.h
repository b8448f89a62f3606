/*
 * vhostballoon native core: guest memory table, split-virtqueue accessor,
 * balloon page tracking and the batched discard engine.
 *
 * Plain C, no Python headers, nothing about vhost-user.  Every guest address
 * is checked against the memory table before it is dereferenced.  Functions
 * that can fail return a negative value and write a human-readable reason,
 * naming the offending values, into err[errlen].
 *
 * This header is also the cffi cdef (csrc/build_native.py reads the part
 * between the CDEF markers), so keep that part free of preprocessor lines.
 */
#ifndef VB_H
#define VB_H

#include <stdint.h>
#include <stddef.h>

#include "vb_config.h"

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
    vb_region regions[32];
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
    uint64_t pages_outside; /* PFNs that lie in no region (ignored) */
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
 * existing region, at most 32 regions), mmaps the fd MAP_SHARED read/write.
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
/* Pops every available buffer (up to max_heads, and only whole buffers that
 * fit in max_pfns) and extracts its device-readable bytes as le32 PFNs.
 * heads[i] receives buffer i's head index.  Returns the number of buffers
 * popped (0: none available), or -1 when the ring is malformed (head out of
 * range, avail index moved by more than num, chain loop or longer than num,
 * descriptor outside guest memory, length not a multiple of 4, a
 * device-writable descriptor, bad indirect table, a buffer larger than
 * max_pfns): nothing is consumed then, and err says what and which values.
 * With event_idx it also publishes avail_event = last_avail_idx. */
int vb_vq_pop_pfns(vb_vq *vq, const vb_mem *mem,
                   uint32_t *pfns, uint32_t max_pfns, uint32_t *n_pfns,
                   uint16_t *heads, uint32_t max_heads,
                   char *err, size_t errlen);
/* Same walk and guards as vb_vq_pop_pfns (avail index, heads, loops,
 * chain length, indirect tables), but returns the descriptors themselves:
 * ranges[] gets every buffer's descriptors in order, counts[i] how many
 * belong to buffer i (heads[i]); only whole buffers that fit in
 * max_ranges are taken.  Every descriptor must be device-writable
 * (writable=1: free page reporting) or device-readable (writable=0:
 * statistics), else the ring is malformed.  Descriptor addresses and
 * lengths are NOT checked against guest memory (nothing is read through
 * them here): the caller validates each one.  Returns buffers popped, 0 if
 * none, -1 (nothing consumed, err set) as vb_vq_pop_pfns; a buffer with
 * more than max_ranges descriptors is malformed. */
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

/* ---- balloon page tracking --------------------------------------------- */
/* Applies an inflate (inflate=1) or deflate (0) to the ballooned bitmap.
 * changed[] receives, in input order, each PFN whose state flipped (so a
 * duplicate within the batch, or an already-ballooned page, is not repeated).
 * Returns the number changed; *n_invalid counts PFNs outside every region
 * (first one in *first_invalid), *n_unchanged those already in that state. */
uint32_t vb_balloon_update(vb_mem *mem, const uint32_t *pfns, uint32_t n, int inflate,
                           uint32_t *changed, uint32_t *n_invalid,
                           uint32_t *first_invalid, uint32_t *n_unchanged);

/* Bytes the kernel holds for the files behind the regions: st_blocks * 512
 * summed over the distinct files (two regions in one memfd count once). */
uint64_t vb_mem_allocated_bytes(const vb_mem *mem);
/* Index of the region holding all of [gpa, gpa+len) (len > 0), or -1. */
int vb_mem_region_of(const vb_mem *mem, uint64_t gpa, uint64_t len);
/* Ballooned pages in [gpa, gpa+len): 4 KiB aligned, inside one region;
 * -1 when it is not. */
int64_t vb_mem_ballooned_in_range(const vb_mem *mem, uint64_t gpa, uint64_t len);

/* ---- discard engine ---------------------------------------------------- */
/* Sorts pfns in place, drops duplicates, coalesces consecutive pages within
 * one region into ranges and frees each with
 * fallocate(PUNCH_HOLE|KEEP_SIZE) on the region's fd at
 * mmap_offset + (gpa - region gpa), falling back to madvise(MADV_REMOVE) on
 * our mapping; a region where both fail is marked (discard_errno) and
 * skipped from then on.  Blocking: call it off the event loop. */
int vb_discard_pfns(vb_mem *mem, uint32_t *pfns, uint32_t n, vb_discard_stats *st);
/* Frees one guest-physical byte range (page aligned) the same way. */
int vb_discard_range(vb_mem *mem, uint64_t gpa, uint64_t len, vb_discard_stats *st);
/* Frees each range (as vb_discard_range; ranges are not merged or sorted
 * here) and classifies it in st (huge_whole, huge_split, ...).  A range
 * that is not 4 KiB aligned or not inside one region is refused (counted in
 * bytes_failed / pages_outside) and the others still run.  Blocking. */
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
/* For PFNs that just became ballooned (vb_balloon_update's changed[]):
 * counts them per huge page and writes to ranges[] one range per run of
 * huge pages that became wholly ballooned (merged when adjacent), then the
 * coalesced pages of regions whose granule is 4 KiB.  The rest become
 * pending.  PFNs outside guest memory, not ballooned in the bitmap, or
 * already counted are ignored.  max_ranges must be >= n (a batch never
 * yields more ranges than PFNs); returns the number of ranges, or -1 when
 * max_ranges < n (nothing done). */
int vb_track_inflate(vb_mem *mem, const uint32_t *pfns, uint32_t n,
                     vb_range *ranges, uint32_t max_ranges);
/* For PFNs that just left the balloon (vb_balloon_update's changed[] on
 * deflate): uncounts them and drops them from pending.  PFNs still
 * ballooned in the bitmap, or not counted, are ignored.  Returns how many
 * pending pages were dropped. */
uint32_t vb_track_deflate(vb_mem *mem, const uint32_t *pfns, uint32_t n);
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
uint32_t vb_crc32(uint32_t crc, const uint8_t *data, uint64_t len);

/* ---- queue workers (serve.c) ---------------------------------------------
 * One thread per inflate or deflate queue serves everything the guest makes
 * available, one pass per kick: pop, bitmap, huge page tracking, discard,
 * used ring, call eventfd.  Every touch of guest memory state (the memory
 * table, rings, bitmap, tracker, discard engine) by anyone happens under one
 * vb_lock; a worker holds it from pop to push and honours a stop request
 * only between batches.  A vb_lock may be released by another thread than
 * the one that took it. */
typedef struct vb_lock vb_lock;
typedef struct vb_worker vb_worker;

typedef struct vb_worker_counters {
    uint64_t kicks;             /* kick eventfd reads */
    uint64_t spurious_kicks;    /* kicks that brought no buffer (the worker paused after each) */
    uint64_t batches;           /* pops that returned buffers */
    uint64_t buffers;           /* buffers returned to the used ring */
    uint64_t pfns;              /* PFNs received */
    uint64_t changed;           /* pages whose ballooned state flipped */
    uint64_t invalid;           /* PFNs outside guest memory (ignored) */
    uint32_t last_invalid_pfn;  /* first invalid PFN of the latest batch that had one */
    uint64_t unchanged;         /* PFNs already in that state (repeated) */
    uint32_t last_unchanged_pfn; /* first such PFN of the latest batch that had one */
    uint64_t pending_dropped;   /* deflate: pending pages dropped */
    uint64_t signals;           /* call eventfd writes */
    uint64_t flushes;           /* pending pages collected at the flush threshold */
    uint64_t freed_measured;    /* bytes the backing files shrank by across our discards */
    uint64_t journal_waits;     /* 1 ms waits for a snapshot (journal full) */
    uint64_t journal_dropped;   /* records dropped: no snapshot came within 2 s */
    vb_discard_stats discard;   /* cumulative; last_errno/failed_region: the latest failure */
    int broken;                 /* the ring was malformed: the worker stopped (error says why) */
    int running;                /* no stop requested or taken yet */
    char error[200];
} vb_worker_counters;

vb_lock *vb_lock_new(void);
void vb_lock_free(vb_lock *l);
void vb_lock_acquire(vb_lock *l);   /* blocking */
int vb_lock_try(vb_lock *l);        /* 1: taken */
void vb_lock_release(vb_lock *l);
/* Starts a worker on a set-up queue.  It works on duplicates of kick_fd,
 * call_fd (-1: none) and notify_fd (-1: none), which it writes when the
 * session should look: invalid or repeated PFNs, a discard failure, a
 * broken ring, pending pages appearing, a flush.  config (NULL: none; it
 * must outlive the worker): the balloon's config, whose num_pages is the
 * target at which an inflate worker frees plain shmem's partial blocks
 * before it returns the buffer that got there.  flush_pages: on inflate,
 * collect and free every collectable pending page once that many are
 * pending (0: never; the session handles deadlines).  NULL on failure (err). */
vb_worker *vb_worker_start(vb_mem *mem, vb_lock *lock, vb_vq *vq, int inflate,
                           int kick_fd, int call_fd, int notify_fd, uint64_t flush_pages,
                           vb_journal *journal, vb_config *config, char *err, size_t errlen);
/* journal (NULL: none), here or later: from now on every batch's flipped PFNs (and a flush that came with it)
 * go to journal before the batch's buffers go back (NULL: none).  Hold
 * the lock.  A full journal makes the worker wait, lock released, for the
 * session's snapshot (it is notified). */
void vb_worker_set_journal(vb_worker *w, vb_journal *journal);
/* Replaces the call eventfd (duplicated; -1: none).  Hold the lock.  -1 if dup failed. */
int vb_worker_set_call_fd(vb_worker *w, int call_fd);
void vb_worker_set_flush_pages(vb_worker *w, uint64_t pages);
/* The worker notifies when pending pages appear only once, then not until
 * asked again with this (the session, once its flush deadline is not armed). */
void vb_worker_notice_pending(vb_worker *w);
void vb_worker_get_counters(vb_worker *w, vb_worker_counters *out);
/* Asks the worker to stop at the next batch boundary; does not wait.  Once
 * the caller then holds the lock, the worker will not touch the queue again. */
void vb_worker_request_stop(vb_worker *w);
void vb_worker_join(vb_worker *w);  /* blocking: waits for the thread to end */
void vb_worker_free(vb_worker *w);  /* joins if needed, closes its fds, frees */

/* ---- the front-end's socket (front.c) --------------------------------------
 * A thread reads the vhost-user socket.  It answers GET_CONFIG and
 * SET_CONFIG of the shape QEMU sends (offset 0, whole 16-byte config, flags
 * 0, no fds) when the session allows it and its decoder is at a message
 * boundary; every other chunk goes to the session verbatim, and the thread
 * waits until the session resumes it. */
typedef struct vb_front vb_front;

typedef struct vb_front_chunk {
    uint32_t len;       /* bytes copied to the caller's buffer */
    int nfds;
    int fds[8];         /* now the caller's */
    int eof;            /* the peer closed the connection */
    int ctrunc;         /* more fds than a message may carry arrived: they were closed */
    int error;          /* errno of a failed read or write; the thread has ended */
} vb_front_chunk;

typedef struct vb_front_counters {
    uint64_t config_reads;    /* GET_CONFIGs answered by the thread */
    uint64_t config_writes;   /* SET_CONFIGs taken by the thread */
    uint64_t handed_over;     /* chunks handed to the session */
    uint64_t log_full;        /* SET_CONFIGs handed over because the write log was full */
} vb_front_counters;

/* Starts the thread on a duplicate of sock_fd; it answers config messages
 * from config (vb_config.h; the caller's, it must outlive the thread) and
 * writes chunk_fd when a chunk waits (vb_front_take), writes_fd when the
 * config's write log stops being empty and target_fd when a write brought
 * the balloon to the target.  It answers nothing until the first
 * vb_front_resume(fast=1).  NULL on failure (err). */
vb_front *vb_front_start(int sock_fd, int chunk_fd, int writes_fd, int target_fd, vb_config *config,
                         char *err, size_t errlen);
/* 1: the waiting chunk was copied to out/data (cap bytes at most); 0: none waits. */
int vb_front_take(vb_front *f, vb_front_chunk *out, uint8_t *data, uint32_t cap);
/* The session handled the chunk it took; fast: the thread may answer config
 * messages; partial: the session's decoder holds part of a message. */
void vb_front_resume(vb_front *f, int fast, int partial);
/* Before the session drains the config's write log: reset writes_fd and target_fd. */
void vb_front_drain_config_signals(vb_front *f);
void vb_front_get_counters(vb_front *f, vb_front_counters *out);
void vb_front_free(vb_front *f);   /* stops and joins the thread, closes its fds */

/* CDEF-END */

#endif
