/*
 * Serving the queues that move pages (inflate, deflate, of any buffer
 * format) in one C call per kick: the runtime's queue workers.
 *
 * A worker thread per queue waits on the queue's kick eventfd and, for
 * everything the guest made available, does in one pass: pop the buffers
 * into ranges with the sink of the queue's format (vring.c), flip the
 * ballooned bitmap (mem.c), count the pages per huge page (track.c), free
 * what may be freed now (discard.c), journal the batch (persist.c), return
 * the buffers to the used ring and signal the call eventfd.  Which sink,
 * which direction and which journal kind come from the queue table
 * (vhostballoon/device/queues.py), so a new queue of an existing format is
 * a row there and nothing here.  The Python session starts and stops workers,
 * keeps the policy's slow decisions (deadlines, "guest at target") and reads
 * the counters; it is woken (notify eventfd) only for what it must log or
 * act on, never per buffer.
 *
 * Locking: every touch of the memory table, the rings, the bitmap and the
 * tracker happens under one vb_lock, which the Python session takes too
 * (its memory lock).  A vb_lock is not owned by a thread: the session may
 * take it in one thread and release it in another (it discards in worker
 * threads), so it is a flag under a mutex, not a bare mutex.  A worker holds
 * it from pop to push: a deflate can never overtake the discard of an
 * inflate, and a stop request is honoured only between batches, so a popped
 * buffer always goes back to the guest.
 *
 * File descriptors: a worker works on its own duplicates of the kick, call
 * and notify eventfds, so the session may close or replace its copies at any
 * moment without the thread ever touching a recycled fd number.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "vb_config.h"
#include "vb_runtime_internal.h"

/* What one pop takes at most: the same limits as the Python Virtqueue
 * (native.py): 1024 buffers, 65536 items (PFNs: Linux sends 256 per
 * buffer, VIRTIO_BALLOON_ARRAY_PFNS_MAX in drivers/virtio/virtio_balloon.c;
 * or ranges).  Each stage's output has room for as many ranges as the pop
 * has items, which is as many as it can make. */
/* Orders the counters keep (the size of vb_worker_counters.range_orders). */
#define RANGE_ORDERS ((int)(sizeof(((vb_worker_counters *)0)->range_orders) / sizeof(uint64_t)))
#define WORKER_MAX_HEADS 1024
#define SERVICE_BUCKETS ((int)(sizeof(((vb_worker_counters *)0)->service_us_buckets) / sizeof(uint64_t)))
#define WORKER_MAX_ITEMS 65536

/* The sink of each buffer format a worker can serve. */
typedef int (*pop_fn)(vb_vq *vq, const vb_mem *mem, vb_range *ranges, uint32_t max_items,
                      vb_batch *batch, uint16_t *heads, uint32_t max_heads, char *err, size_t errlen);

static const struct {
    int format;
    pop_fn pop;
    int whole;      /* a range is the guest's unit: refused whole rather than in part */
    const char *name;
} SINKS[] = {
    {VB_FORMAT_PFN32, vb_vq_pop_pfn32, 0, "pfn32"},
    {VB_FORMAT_EXTENTS, vb_vq_pop_extents, 1, "extents"},
};

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

struct vb_lock {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int held;
};

vb_lock *vb_lock_new(void)
{
    vb_lock *l = calloc(1, sizeof(*l));

    if (l == NULL) {
        return NULL;
    }
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->cv, NULL);
    return l;
}

void vb_lock_free(vb_lock *l)
{
    if (l == NULL) {
        return;
    }
    pthread_cond_destroy(&l->cv);
    pthread_mutex_destroy(&l->mu);
    free(l);
}

void vb_lock_acquire(vb_lock *l)
{
    pthread_mutex_lock(&l->mu);
    while (l->held) {
        pthread_cond_wait(&l->cv, &l->mu);
    }
    l->held = 1;
    pthread_mutex_unlock(&l->mu);
}

int vb_lock_try(vb_lock *l)
{
    int got = 0;

    pthread_mutex_lock(&l->mu);
    if (!l->held) {
        l->held = 1;
        got = 1;
    }
    pthread_mutex_unlock(&l->mu);
    return got;
}

void vb_lock_release(vb_lock *l)
{
    pthread_mutex_lock(&l->mu);
    l->held = 0;
    pthread_cond_signal(&l->cv);
    pthread_mutex_unlock(&l->mu);
}

struct vb_worker {
    vb_mem *mem;
    vb_lock *lock;
    vb_vq *vq;
    pop_fn pop;
    int whole;
    int inflate;
    uint32_t journal_kind;
    int kick_fd, call_fd, notify_fd, stop_fd;   /* our own duplicates */
    uint64_t flush_pages;   /* atomic: collect pending pages at this many; 0 never */
    int stop;               /* atomic: leave at the next batch boundary */
    int pending_notice;     /* atomic: notify when pending pages appear (once; the session re-asks) */
    uint64_t batch_pending; /* inflate: pending pages of batch-tracked regions after the last pass */
    vb_journal *journal;
    vb_config *config;      /* the session's (NULL: none): its num_pages is the target */
    pthread_t thread;
    int started;
    pthread_mutex_t counters_mu;
    vb_worker_counters c;
    vb_range *in;           /* what the sink made of the buffers */
    vb_range *changed;      /* inflate: the pages that flipped */
    vb_range *ranges;       /* what to free now */
    uint16_t *heads;
};

static void discard_stats_add(vb_discard_stats *dst, const vb_discard_stats *src)
{
    dst->bytes_freed += src->bytes_freed;
    dst->bytes_failed += src->bytes_failed;
    dst->ranges += src->ranges;
    dst->syscalls += src->syscalls;
    dst->pages_outside += src->pages_outside;
    dst->huge_whole += src->huge_whole;
    dst->huge_split += src->huge_split;
    dst->hugetlb_partial_bytes += src->hugetlb_partial_bytes;
    dst->bytes_shmem += src->bytes_shmem;
    dst->bytes_hugetlbfs += src->bytes_hugetlbfs;
    dst->bytes_file += src->bytes_file;
    if (src->failed_region >= 0) {
        dst->last_errno = src->last_errno;
        dst->failed_region = src->failed_region;
    }
}

/* Frees ranges[0..n) and everything pending if the policy's threshold is
 * reached; adds to *st and *measured.  Lock held. */
static void free_now(vb_worker *w, uint32_t n, vb_discard_stats *st, uint64_t *measured, int *flushed)
{
    uint64_t threshold = __atomic_load_n(&w->flush_pages, __ATOMIC_RELAXED);
    vb_range *extra = NULL;
    uint32_t n_extra = 0;
    uint64_t before, after;
    vb_discard_stats one;

    if (w->inflate && threshold != 0) {
        uint64_t collectable = vb_track_pending(w->mem, 1, NULL);

        if (collectable >= threshold) {
            extra = malloc(collectable * sizeof(*extra));
            if (extra != NULL) {   /* no memory: they stay pending for the session's flush */
                n_extra = vb_track_collect(w->mem, -1, extra, (uint32_t)collectable);
                *flushed = 1;
            }
        }
    }
    if (n == 0 && n_extra == 0) {
        free(extra);
        return;
    }
    before = vb_mem_allocated_bytes(w->mem);
    if (n) {
        vb_discard_ranges(w->mem, w->ranges, n, &one);
        discard_stats_add(st, &one);
    }
    if (n_extra) {
        vb_discard_ranges(w->mem, extra, n_extra, &one);
        discard_stats_add(st, &one);
    }
    after = vb_mem_allocated_bytes(w->mem);
    *measured += before > after ? before - after : 0;
    free(extra);
}

/* How long a worker waits (1 ms per try) for the session's snapshot when
 * the journal is full before it drops the record. */
#define JOURNAL_WAIT_TRIES 2000

/* Appends a record of ranges (none: NULL, 0). */
static int journal_record(vb_worker *w, uint32_t kind, const vb_range *ranges, uint32_t n)
{
    int rc;

    /* Full: only a snapshot makes room, and the session takes it under the
     * lock.  Wait with the lock released (the popped buffers stay with us);
     * a stop request ends the wait (the session's last snapshot at close
     * then covers the batch). */
    int tries = 0;

    while ((rc = vb_journal_append_ranges(w->journal, kind, ranges, n)) < 0) {
        if (__atomic_load_n(&w->stop, __ATOMIC_ACQUIRE) || ++tries > JOURNAL_WAIT_TRIES) {
            /* No snapshot came (it failed: disk full?) or we are stopping:
             * the guest must not hang on us.  The record is dropped and
             * counted; the session says a restart may now forget pages. */
            pthread_mutex_lock(&w->counters_mu);
            w->c.journal_dropped++;
            pthread_mutex_unlock(&w->counters_mu);
            return 0;
        }
        pthread_mutex_lock(&w->counters_mu);
        w->c.journal_waits++;
        pthread_mutex_unlock(&w->counters_mu);
        vb_eventfd_signal(w->notify_fd);
        vb_lock_release(w->lock);
        {
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        }
        vb_lock_acquire(w->lock);
    }
    return rc;
}

/* Journals a batch's ranges and a flush that came with it; 1 when the
 * session should snapshot soon. */
static int journal_batch(vb_worker *w, const vb_range *ranges, uint32_t n, int flushed)
{
    int half = 0;

    if (n) {
        half |= journal_record(w, w->journal_kind, ranges, n) > 0;
    }
    if (flushed) {
        half |= journal_record(w, VB_JOURNAL_COLLECT, NULL, 0) > 0;
    }
    return half;
}

/* Plain shmem pages are pending and the guest will be at its target once
 * it has these buffers back: its actual then grows by the pages it sent
 * (Linux counts every page it sends; a batch's ranges are exactly those
 * pages), and vb_at_target says whether that is the target.  So the last
 * buffer goes back only after the partial blocks are freed ("at target"
 * means "freed").  Lock held. */
static int at_target(vb_worker *w, const vb_range *sent, uint32_t n)
{
    vb_config_values v;
    uint64_t pages = 0;

    if (w->config == NULL || vb_track_pending_batch(w->mem) == 0) {
        return 0;
    }
    for (uint32_t i = 0; i < n; i++) {
        pages += sent[i].len >> VB_PAGE_SHIFT;
    }
    vb_config_get(w->config, &v);
    return vb_at_target(v.num_pages, (uint64_t)v.actual + pages);
}

/* Frees every pending page of plain shmem regions (lock held); 1 if any. */
static int flush_batch(vb_worker *w, vb_discard_stats *st, uint64_t *measured, int *flushed)
{
    int any = 0;
    uint32_t n;

    while ((n = vb_track_collect_batch(w->mem, w->ranges, WORKER_MAX_ITEMS)) > 0) {
        free_now(w, n, st, measured, flushed);
        any = 1;
    }
    return any;
}

/* Serves every buffer available now, batch by batch.  Returns 1 when the
 * session should look (something to log, a ring broken, pending pages
 * appeared), 0 otherwise.  Takes and releases the lock. */
static int serve_available(vb_worker *w)
{
    int notify = 0;

    vb_lock_acquire(w->lock);
    for (;;) {
        char err[sizeof(w->c.error)];
        vb_batch batch;
        vb_update up;
        uint64_t popped_ns, service_ns;
        uint32_t n_ranges = 0;
        uint64_t pending_before = 0, pending_dropped = 0, measured = 0;
        vb_discard_stats st;
        int popped, flushed = 0, batch_flushed = 0;

        if (__atomic_load_n(&w->stop, __ATOMIC_ACQUIRE) || !w->vq->ready) {
            break;
        }
        err[0] = '\0';
        popped = w->pop(w->vq, w->mem, w->in, WORKER_MAX_ITEMS, &batch, w->heads, WORKER_MAX_HEADS,
                        err, sizeof(err));
        if (popped < 0) {
            pthread_mutex_lock(&w->counters_mu);
            w->c.broken = 1;
            memcpy(w->c.error, err, sizeof(err));
            pthread_mutex_unlock(&w->counters_mu);
            notify = 1;
            __atomic_store_n(&w->stop, 1, __ATOMIC_RELEASE);
            break;
        }
        if (popped == 0) {
            break;
        }
        popped_ns = now_ns();
        memset(&st, 0, sizeof(st));
        st.failed_region = -1;
        /* changed[] has room: a PFN batch has at most WORKER_MAX_ITEMS
         * pages, an extents batch (judged whole) that many ranges. */
        vb_balloon_update(w->mem, w->in, batch.n_ranges, w->inflate, w->whole,
                          w->inflate ? w->changed : NULL, WORKER_MAX_ITEMS, &up);
        if (w->inflate) {
            int nr;

            pending_before = vb_track_pending(w->mem, 1, NULL);
            nr = vb_track_inflate(w->mem, w->changed, up.n_changed, w->ranges, WORKER_MAX_ITEMS);
            n_ranges = nr > 0 ? (uint32_t)nr : 0;
            /* Freed before the buffers go back: the guest may reuse a page
             * only after it deflates it, and its deflate waits for our lock. */
            free_now(w, n_ranges, &st, &measured, &flushed);
            /* The balloon reached the session's target: the partial blocks
             * of plain shmem go too, before the guest sees its last buffer
             * back (then "at target" means "freed", as without batching). */
            batch_flushed = at_target(w, w->in, batch.n_ranges) && flush_batch(w, &st, &measured, &flushed);
            if (pending_before == 0 && vb_track_pending(w->mem, 1, NULL) > 0 &&
                __atomic_exchange_n(&w->pending_notice, 0, __ATOMIC_ACQ_REL)) {
                notify = 1;   /* the session arms the flush deadline */
            }
        } else if (up.changed_pages) {
            /* Deflate is sacred: these pages leave pending tracking before
             * the buffer goes back, so nothing can free them any more. */
            pending_dropped = vb_track_deflate(w->mem, w->in, batch.n_ranges);
        }
        if (w->journal != NULL && (up.changed_pages || flushed)) {
            /* Journaled before the guest sees the buffers back: a page it
             * deflates is never freed after a restart (persist.py).  An
             * inflate records what flipped; a deflate its ranges (the pages
             * not ballooned in them stay so on replay). */
            if (journal_batch(w, w->inflate ? w->changed : w->in, w->inflate ? up.n_changed : batch.n_ranges,
                              flushed)) {
                notify = 1;
            }
        }
        if (w->journal != NULL && batch_flushed && journal_record(w, VB_JOURNAL_COLLECT_BATCH, NULL, 0) > 0) {
            notify = 1;
        }
        if (!w->vq->ready) {
            /* Only after a wait for the journal, lock released: the ring
             * was set up again and failed meanwhile.  Its pointers may be
             * gone; the queue is dead for the guest anyway. */
            break;
        }
        vb_vq_push_used(w->vq, w->heads, NULL, (uint32_t)popped);
        service_ns = now_ns() - popped_ns;

        pthread_mutex_lock(&w->counters_mu);
        w->c.batches++;
        w->c.buffers += (uint64_t)popped;
        w->c.pfns += batch.items;
        w->c.changed += up.changed_pages;
        w->c.pending_dropped += pending_dropped;
        w->c.invalid += up.invalid_pages;
        if (up.invalid_pages) {
            w->c.last_invalid_pfn = (uint32_t)(up.first_invalid_gpa >> VB_PAGE_SHIFT);
        }
        w->c.unchanged += up.unchanged_pages;
        if (up.unchanged_pages) {
            w->c.last_unchanged_pfn = (uint32_t)(up.first_unchanged_gpa >> VB_PAGE_SHIFT);
        }
        if (batch.refused || up.refused) {
            w->c.refused += batch.refused + up.refused;
            w->c.last_refused_gpa = batch.refused ? batch.first_refused_gpa : up.first_refused_gpa;
            w->c.last_refused_len = batch.refused ? batch.first_refused_len : up.first_refused_len;
            w->c.last_refused_why = batch.refused ? batch.first_refused_why : VB_REFUSE_BALLOONED;
        }
        if (w->inflate && w->whole) {
            /* Each accepted range flipped whole and is one changed range. */
            for (uint32_t i = 0; i < up.n_changed; i++) {
                uint64_t pages = w->changed[i].len >> VB_PAGE_SHIFT;
                int order = pages ? 63 - __builtin_clzll(pages) : 0;

                w->c.range_orders[order < RANGE_ORDERS ? order : RANGE_ORDERS - 1]++;
            }
        }
        {
            uint64_t us = service_ns / 1000;
            int bucket = us ? 64 - __builtin_clzll(us) : 0;   /* us < 2^bucket */

            w->c.service_us_buckets[bucket < SERVICE_BUCKETS ? bucket : SERVICE_BUCKETS - 1] += (uint64_t)popped;
            w->c.service_ns_sum += service_ns * (uint64_t)popped;
        }
        w->c.flushes += (uint64_t)flushed;
        w->c.freed_measured += measured;
        if (st.bytes_failed) {
            notify = 1;
        }
        discard_stats_add(&w->c.discard, &st);
        pthread_mutex_unlock(&w->counters_mu);
        if (up.invalid_pages || up.unchanged_pages || batch.refused || up.refused || flushed) {
            notify = 1;
        }
        if (vb_vq_should_signal(w->vq)) {
            vb_eventfd_signal(w->call_fd);
            __atomic_add_fetch(&w->c.signals, 1, __ATOMIC_RELAXED);
        }
    }
    if (w->inflate) {
        w->batch_pending = vb_track_pending_batch(w->mem);
    }
    vb_lock_release(w->lock);
    return notify;
}

/* The inflate queue has been quiet for IDLE_FLUSH_MS with pages of plain
 * shmem pending in partial 2 MiB blocks: the guest stopped short of a block
 * (or of its target), so free them now.  Takes and releases the lock. */
static void idle_flush(vb_worker *w)
{
    vb_discard_stats st;
    uint64_t measured = 0;
    int flushed = 0;

    memset(&st, 0, sizeof(st));
    st.failed_region = -1;
    vb_lock_acquire(w->lock);
    if (flush_batch(w, &st, &measured, &flushed) && w->journal != NULL) {
        journal_record(w, VB_JOURNAL_COLLECT_BATCH, NULL, 0);
    }
    w->batch_pending = vb_track_pending_batch(w->mem);
    pthread_mutex_lock(&w->counters_mu);
    w->c.freed_measured += measured;
    discard_stats_add(&w->c.discard, &st);
    pthread_mutex_unlock(&w->counters_mu);
    vb_lock_release(w->lock);
    if (st.bytes_failed) {
        vb_eventfd_signal(w->notify_fd);
    }
}

/* A kick that brought no buffer costs a lock round and a pop; a guest that
 * floods kicks would keep both workers spinning (two cores).  After such a
 * kick the worker pauses this long: a flood then costs each worker a small
 * fraction of a core, and a real kick, which always follows new buffers, waits at most
 * this much more (scripts/faults/kick_flood.py). */
#define SPURIOUS_KICK_PAUSE_NS 200000

/* How long the inflate queue may stay quiet before pending plain shmem
 * pages are freed (idle_flush). */
#define IDLE_FLUSH_MS 10

static void *worker_main(void *arg)
{
    vb_worker *w = arg;
    struct pollfd fds[2] = {{.fd = w->kick_fd, .events = POLLIN}, {.fd = w->stop_fd, .events = POLLIN}};
    int kicked = 0, rc;

    for (;;) {
        uint64_t buffers_before = __atomic_load_n(&w->c.buffers, __ATOMIC_RELAXED);

        /* Buffers may be there before the first kick (a restarted ring). */
        if (serve_available(w)) {
            vb_eventfd_signal(w->notify_fd);
        }
        if (kicked && __atomic_load_n(&w->c.buffers, __ATOMIC_RELAXED) == buffers_before) {
            struct timespec ts = {0, SPURIOUS_KICK_PAUSE_NS};

            __atomic_add_fetch(&w->c.spurious_kicks, 1, __ATOMIC_RELAXED);
            nanosleep(&ts, NULL);
        }
        kicked = 0;
        if (__atomic_load_n(&w->stop, __ATOMIC_ACQUIRE)) {
            break;
        }
        rc = poll(fds, 2, w->batch_pending ? IDLE_FLUSH_MS : -1);
        if (rc < 0) {
            if (errno == EINTR) {
                continue;
            }
            break;   /* cannot happen with valid fds; the session sees the thread gone */
        }
        if (rc == 0) {
            idle_flush(w);
            continue;
        }
        if (fds[1].revents) {
            break;
        }
        if (fds[0].revents & POLLIN) {
            uint64_t value;

            if (read(w->kick_fd, &value, sizeof(value)) == (ssize_t)sizeof(value)) {
                __atomic_add_fetch(&w->c.kicks, 1, __ATOMIC_RELAXED);
                kicked = 1;
            }
        } else if (fds[0].revents) {   /* POLLERR/POLLNVAL: nothing more will come */
            break;
        }
    }
    __atomic_store_n(&w->stop, 1, __ATOMIC_RELEASE);
    return NULL;
}

static void worker_release(vb_worker *w)
{
    int *fds[] = {&w->kick_fd, &w->call_fd, &w->notify_fd, &w->stop_fd};

    for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++) {
        if (*fds[i] >= 0) {
            close(*fds[i]);
            *fds[i] = -1;
        }
    }
    free(w->in);
    free(w->changed);
    free(w->heads);
    free(w->ranges);
    pthread_mutex_destroy(&w->counters_mu);
    free(w);
}

static int dup_or_none(int fd)
{
    return fd < 0 ? -1 : fcntl(fd, F_DUPFD_CLOEXEC, 0);
}

vb_worker *vb_worker_start(vb_mem *mem, vb_lock *lock, vb_vq *vq, int format, int direction,
                           int kick_fd, int call_fd, int notify_fd, uint64_t flush_pages,
                           vb_journal *journal, uint32_t journal_kind, vb_config *config,
                           char *err, size_t errlen)
{
    vb_worker *w;
    size_t sink = 0;

    while (sink < sizeof(SINKS) / sizeof(SINKS[0]) && SINKS[sink].format != format) {
        sink++;
    }
    if (sink == sizeof(SINKS) / sizeof(SINKS[0])) {
        vb_seterr(err, errlen, "a queue worker cannot serve buffer format %d (only PFN32 %d and EXTENTS %d)",
                  format, VB_FORMAT_PFN32, VB_FORMAT_EXTENTS);
        return NULL;
    }
    if (direction != VB_DIRECTION_INFLATE && direction != VB_DIRECTION_DEFLATE) {
        vb_seterr(err, errlen, "a queue worker moves pages in or out, not in direction %d", direction);
        return NULL;
    }
    w = calloc(1, sizeof(*w));
    if (w == NULL) {
        vb_seterr(err, errlen, "out of memory for a queue worker");
        return NULL;
    }
    w->mem = mem;
    w->lock = lock;
    w->vq = vq;
    w->pop = SINKS[sink].pop;
    w->whole = SINKS[sink].whole;
    w->inflate = direction == VB_DIRECTION_INFLATE;
    w->journal_kind = journal_kind;
    w->flush_pages = flush_pages;
    w->pending_notice = 1;
    w->journal = journal;
    w->config = config;
    w->c.discard.failed_region = -1;
    pthread_mutex_init(&w->counters_mu, NULL);
    w->kick_fd = dup_or_none(kick_fd);
    w->call_fd = dup_or_none(call_fd);
    w->notify_fd = dup_or_none(notify_fd);
    w->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    w->in = malloc(WORKER_MAX_ITEMS * sizeof(*w->in));
    w->changed = malloc(WORKER_MAX_ITEMS * sizeof(*w->changed));
    w->heads = malloc(WORKER_MAX_HEADS * sizeof(*w->heads));
    w->ranges = malloc(WORKER_MAX_ITEMS * sizeof(*w->ranges));
    if (kick_fd < 0 || w->kick_fd < 0 || (call_fd >= 0 && w->call_fd < 0) ||
        (notify_fd >= 0 && w->notify_fd < 0) || w->stop_fd < 0) {
        vb_seterr(err, errlen, "queue worker: cannot duplicate its eventfds (kick %d, call %d): %s",
                  kick_fd, call_fd, strerror(errno));
        worker_release(w);
        return NULL;
    }
    if (!w->in || !w->changed || !w->heads || !w->ranges) {
        vb_seterr(err, errlen, "out of memory for a queue worker's buffers");
        worker_release(w);
        return NULL;
    }
    if (vb_thread_start(&w->thread, worker_main, w, w->inflate ? "vb-inflate" : "vb-deflate", "a queue worker",
                        err, errlen) < 0) {
        worker_release(w);
        return NULL;
    }
    w->started = 1;
    return w;
}

int vb_worker_set_call_fd(vb_worker *w, int call_fd)
{
    int fd = dup_or_none(call_fd);

    if (call_fd >= 0 && fd < 0) {
        return -1;
    }
    if (w->call_fd >= 0) {
        close(w->call_fd);
    }
    w->call_fd = fd;
    return 0;
}

void vb_worker_notice_pending(vb_worker *w)
{
    __atomic_store_n(&w->pending_notice, 1, __ATOMIC_RELEASE);
}

void vb_worker_set_flush_pages(vb_worker *w, uint64_t pages)
{
    __atomic_store_n(&w->flush_pages, pages, __ATOMIC_RELAXED);
}

void vb_worker_get_counters(vb_worker *w, vb_worker_counters *out)
{
    pthread_mutex_lock(&w->counters_mu);
    *out = w->c;
    out->kicks = __atomic_load_n(&w->c.kicks, __ATOMIC_RELAXED);
    out->signals = __atomic_load_n(&w->c.signals, __ATOMIC_RELAXED);
    out->spurious_kicks = __atomic_load_n(&w->c.spurious_kicks, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&w->counters_mu);
    out->running = !__atomic_load_n(&w->stop, __ATOMIC_ACQUIRE);
}

void vb_worker_request_stop(vb_worker *w)
{
    __atomic_store_n(&w->stop, 1, __ATOMIC_RELEASE);
    vb_eventfd_signal(w->stop_fd);
}

void vb_worker_join(vb_worker *w)
{
    if (w->started) {
        vb_worker_request_stop(w);
        pthread_join(w->thread, NULL);
        w->started = 0;
    }
}

void vb_worker_free(vb_worker *w)
{
    if (w == NULL) {
        return;
    }
    vb_worker_join(w);
    worker_release(w);
}
