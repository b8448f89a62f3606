/*
 * vhostballoon native runtime: the lock, the queue worker threads
 * (serve.c) and the front-end socket reader (front.c).  It is handed what
 * it must know of vhost-user, of the config layout and of the journal's
 * record kinds by vb_gen.h, generated at build time from the Python
 * sources; the core (vb_core.h) does the work.
 *
 * The part between the CDEF markers is also the cffi cdef
 * (csrc/build_native.py): no preprocessor lines there.
 */
#ifndef VB_RUNTIME_H
#define VB_RUNTIME_H

#include "vb_config.h"
#include "vb_core.h"

/* CDEF-BEGIN */

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
    uint64_t pfns;              /* items received: PFNs (PFN32) or ranges (EXTENTS) */
    uint64_t changed;           /* pages whose ballooned state flipped */
    uint64_t invalid;           /* pages outside guest memory (ignored) */
    uint32_t last_invalid_pfn;  /* first invalid page of the latest batch that had one */
    uint64_t unchanged;         /* pages already in that state (repeated) */
    uint32_t last_unchanged_pfn; /* first such page of the latest batch that had one */
    uint64_t refused;           /* ranges refused (extents: malformed, or inflating ballooned pages) */
    uint64_t last_refused_gpa;  /* first refused range of the latest batch that had one */
    uint64_t last_refused_len;
    int last_refused_why;       /* its VB_REFUSE_* */
    uint64_t pending_dropped;   /* deflate: pending pages dropped */
    uint64_t signals;           /* call eventfd writes */
    uint64_t flushes;           /* pending pages collected at the flush threshold */
    uint64_t freed_measured;    /* bytes the backing files shrank by across our discards */
    uint64_t journal_waits;     /* 1 ms waits for a snapshot (journal full) */
    uint64_t journal_dropped;   /* records dropped: no snapshot came within 2 s */
    vb_discard_stats discard;   /* cumulative; last_errno/failed_region: the latest failure */
    uint64_t range_orders[32];  /* extents inflate: accepted ranges by order (log2 of their 4 KiB pages) */
    /* Buffers by their service time, pop to used ring (the device's share of
     * the guest's round trip): bucket i holds times under 2^i us, the last
     * everything above; and the sum of those times in ns. */
    uint64_t service_us_buckets[20];
    uint64_t service_ns_sum;
    int broken;                 /* the ring was malformed: the worker stopped (error says why) */
    int running;                /* no stop requested or taken yet */
    char error[200];
} vb_worker_counters;

vb_lock *vb_lock_new(void);
void vb_lock_free(vb_lock *l);
void vb_lock_acquire(vb_lock *l);   /* blocking */
int vb_lock_try(vb_lock *l);        /* 1: taken */
void vb_lock_release(vb_lock *l);
/* How a worker's queue moves pages (the queue table's direction). */
enum {
    VB_DIRECTION_DEFLATE = 0,
    VB_DIRECTION_INFLATE = 1
};

/* Starts a worker on a set-up queue whose buffers have format `format`
 * (VB_FORMAT_PFN32 or VB_FORMAT_EXTENTS: the sink that turns them into
 * ranges) and move pages in `direction` (VB_DIRECTION_*).  It works on
 * duplicates of kick_fd, call_fd (-1: none) and notify_fd (-1: none), which
 * it writes when the session should look: invalid, repeated or refused
 * pages, a discard failure, a broken ring, pending pages appearing, a
 * flush.  flush_pages: on inflate, collect and free every collectable
 * pending page once that many are pending (0: never; the session handles
 * deadlines).  journal (NULL: none): every batch's ranges (journal_kind)
 * and flushes go to it before the batch's buffers go back; a full journal
 * makes the worker wait, lock released, for the session's snapshot (it is
 * notified).  config (NULL: none; it must outlive the worker): the
 * balloon's config mailbox, whose num_pages is the target at which an
 * inflate worker frees plain shmem's partial blocks before it returns the
 * buffer that brings the guest there (vb_at_target).  NULL on failure (err). */
vb_worker *vb_worker_start(vb_mem *mem, vb_lock *lock, vb_vq *vq, int format, int direction,
                           int kick_fd, int call_fd, int notify_fd, uint64_t flush_pages,
                           vb_journal *journal, uint32_t journal_kind, vb_config *config,
                           char *err, size_t errlen);
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
    int fds[VB_VHOST_USER_MAX_FDS]; /* now the caller's */
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
