/*
 * Split virtqueue accessor (virtio 1.x section 2.7), device side, and the
 * sinks that turn popped buffers into ranges of guest addresses, one per
 * buffer format (vb_core.h).  Uses mem.c and ranges.c.
 *
 * The rings live in guest RAM that the guest may rewrite at any moment, so
 * every field is loaded exactly once into a local and checked before use,
 * and every guest address is translated through the memory table with its
 * full length before anything is read from it.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <inttypes.h>
#include <string.h>

#include "vb_internal.h"

/* Descriptor flags, virtio 1.x 2.7.5 (struct virtq_desc). */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
/* virtio 1.x 2.7.6 (struct virtq_avail flags). */
#define VRING_AVAIL_F_NO_INTERRUPT 1

/* Largest queue size a split ring may have: virtio 1.x 2.7 "Queue Size ...
 * the maximum Queue Size value is 32768". */
#define VB_VQ_MAX_NUM 32768u
/* An indirect table holds at most 32768 descriptors (the same bound; Linux
 * and QEMU apply it too). */
#define VB_MAX_INDIRECT 32768u

/* Guest layout of the rings (all little-endian). Offsets, not C structs, so
 * the compiler never gets to assume anything about guest memory. */
#define DESC_SIZE 16u
#define DESC_OFF_ADDR 0
#define DESC_OFF_LEN 8
#define DESC_OFF_FLAGS 12
#define DESC_OFF_NEXT 14
#define AVAIL_OFF_FLAGS 0
#define AVAIL_OFF_IDX 2
#define AVAIL_OFF_RING 4
#define USED_OFF_FLAGS 0
#define USED_OFF_IDX 2
#define USED_OFF_RING 4
#define USED_ELEM_SIZE 8u

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

/* Loads of single aligned fields of guest memory: one access each, never
 * re-read by the compiler. */
static inline uint16_t load16(const void *p, int order)
{
    return le16toh(__atomic_load_n((const uint16_t *)p, order));
}

static inline void store16(void *p, uint16_t v, int order)
{
    __atomic_store_n((uint16_t *)p, htole16(v), order);
}

static inline void store32(void *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)p, htole32(v), __ATOMIC_RELAXED);
}

/* Descriptors in an indirect table need not be aligned, so copy the 16
 * bytes out once; the compiler barrier stops the compiler from going back
 * to guest memory for a field instead of using the copy. */
static inline void read_desc(const uint8_t *table, uint32_t i, struct desc *d)
{
    uint8_t raw[DESC_SIZE];
    uint64_t a;
    uint32_t l;
    uint16_t f, n;

    memcpy(raw, table + (size_t)i * DESC_SIZE, DESC_SIZE);
    __asm__ __volatile__("" ::: "memory");
    memcpy(&a, raw + DESC_OFF_ADDR, 8);
    memcpy(&l, raw + DESC_OFF_LEN, 4);
    memcpy(&f, raw + DESC_OFF_FLAGS, 2);
    memcpy(&n, raw + DESC_OFF_NEXT, 2);
    d->addr = le64toh(a);
    d->len = le32toh(l);
    d->flags = le16toh(f);
    d->next = le16toh(n);
}

static inline uint8_t *avail_ring(const vb_vq *vq, uint32_t slot)
{
    return (uint8_t *)vq->avail + AVAIL_OFF_RING + 2 * (size_t)slot;
}

/* used_event lives after avail->ring[num], avail_event after used->ring[num]
 * (virtio 1.x 2.7.6, 2.7.8). */
static inline uint8_t *used_event_ptr(const vb_vq *vq)
{
    return (uint8_t *)vq->avail + AVAIL_OFF_RING + 2 * (size_t)vq->num;
}

static inline uint8_t *avail_event_ptr(const vb_vq *vq)
{
    return (uint8_t *)vq->used + USED_OFF_RING + USED_ELEM_SIZE * (size_t)vq->num;
}

static void *map_ring(const vb_mem *mem, const char *what, uint64_t uaddr, uint64_t len,
                      uint64_t align, char *err, size_t errlen)
{
    void *host;

    if (uaddr & (align - 1)) {
        vb_seterr(err, errlen, "%s ring at uaddr 0x%" PRIx64 " is not %" PRIu64
                  "-byte aligned", what, uaddr, align);
        return NULL;
    }
    host = vb_mem_uaddr_to_host(mem, uaddr, len);
    if (host == NULL) {
        vb_seterr(err, errlen, "%s ring at uaddr 0x%" PRIx64 " size 0x%" PRIx64
                  " is outside guest memory", what, uaddr, len);
        return NULL;
    }
    if ((uintptr_t)host & (align - 1)) {
        /* Only possible when a region's uaddr is not page aligned. */
        vb_seterr(err, errlen, "%s ring at uaddr 0x%" PRIx64 " maps to a host address"
                  " that is not %" PRIu64 "-byte aligned", what, uaddr, align);
        return NULL;
    }
    return host;
}

int vb_vq_setup(vb_vq *vq, const vb_mem *mem, uint32_t num,
                uint64_t desc_uaddr, uint64_t avail_uaddr, uint64_t used_uaddr,
                uint16_t base, int event_idx, int indirect,
                char *err, size_t errlen)
{
    void *desc, *avail, *used;

    vq->ready = 0;
    if (num == 0 || num > VB_VQ_MAX_NUM || (num & (num - 1)) != 0) {
        vb_seterr(err, errlen, "ring size %" PRIu32 " is not a power of two in 1..%u",
                  num, VB_VQ_MAX_NUM);
        return -1;
    }
    /* Sizes and alignments: virtio 1.x 2.7 table "Virtqueue Part". */
    desc = map_ring(mem, "descriptor", desc_uaddr, (uint64_t)DESC_SIZE * num, 16, err, errlen);
    if (desc == NULL) {
        return -1;
    }
    avail = map_ring(mem, "available", avail_uaddr, 6 + 2 * (uint64_t)num, 2, err, errlen);
    if (avail == NULL) {
        return -1;
    }
    used = map_ring(mem, "used", used_uaddr, 6 + (uint64_t)USED_ELEM_SIZE * num, 4, err, errlen);
    if (used == NULL) {
        return -1;
    }
    memset(vq, 0, sizeof(*vq));
    vq->num = num;
    vq->desc = desc;
    vq->avail = avail;
    vq->used = used;
    vq->last_avail_idx = base;
    vq->used_idx = base;
    vq->signalled_used = base;
    vq->signalled_used_valid = 0;
    vq->event_idx = event_idx != 0;
    vq->indirect = indirect != 0;
    vq->ready = 1;
    return 0;
}

/*
 * What the walker does with each data descriptor of a buffer.  pop_one
 * follows the chain (and at most one indirect table) and hands every
 * descriptor that is not INDIRECT to take(); pop_buffers keeps only whole
 * buffers: one whose items do not fit in what is left of the caller's
 * array stays in the ring for the next call.  A sink writes its outputs
 * (ranges, descriptors) at out_stored + out_count; a buffer never yields
 * more outputs than items, so an output array of `capacity` suffices.
 */
struct sink {
    int (*take)(struct sink *s, const vb_mem *mem, uint16_t head, const char *where,
                uint32_t i, const struct desc *d, char *err, size_t errlen);
    const char *items;   /* "PFNs" or "descriptors", for messages */
    uint32_t capacity;   /* items one call can return */
    uint32_t stored;     /* items of the buffers already accepted in this call */
    uint32_t out_stored; /* outputs of the buffers already accepted */
    uint64_t count;      /* items of the buffer being walked */
    uint32_t out_count;  /* its outputs so far */
    int fits;            /* the current buffer's items are all stored so far */
    /* Refused ranges: of the buffer being walked (buf_*), of those accepted. */
    uint64_t buf_refused, refused;
    vb_range buf_first, first;
    int buf_why, why;
};

static inline int sink_room(const struct sink *s, uint64_t more)
{
    return s->fits && s->stored + s->count + more <= s->capacity;
}

static void sink_refuse(struct sink *s, uint64_t gpa, uint64_t len, int why)
{
    if (s->buf_refused++ == 0) {
        s->buf_first = (vb_range){gpa, len};
        s->buf_why = why;
    }
}

/* PFN32: device-readable arrays of le32 PFNs, coalesced into ranges of
 * consecutive pages, ascending or descending (Linux hands them over in
 * descending runs), within one buffer and one region (or one gap between
 * regions): ranges in input order, each page of the buffer in exactly one,
 * nothing dropped (vb_balloon_update judges each page). */
struct pfn_sink {
    struct sink base;
    vb_range *out;
    const vb_mem *mem;
    uint64_t low, high;    /* where the open range may grow (vb_ranges_run_bounds) */
};

static int take_pfns(struct sink *base, const vb_mem *mem, uint16_t head, const char *where,
                     uint32_t i, const struct desc *d, char *err, size_t errlen)
{
    struct pfn_sink *s = (struct pfn_sink *)base;
    const uint8_t *src;
    uint32_t npfns;

    if (d->flags & VRING_DESC_F_WRITE) {
        vb_seterr(err, errlen, "head %u: %s %" PRIu32 " is device-writable (flags 0x%x)"
                  " in an inflate/deflate buffer", head, where, i, d->flags);
        return -1;
    }
    if (d->len % 4 != 0) {
        vb_seterr(err, errlen, "head %u: %s %" PRIu32 ": len %" PRIu32
                  " is not a multiple of 4 (le32 PFNs)", head, where, i, d->len);
        return -1;
    }
    if (d->len == 0) {
        return 0;
    }
    src = vb_mem_gpa_to_host(mem, d->addr, d->len);
    if (src == NULL) {
        vb_seterr(err, errlen, "head %u: %s %" PRIu32 ": addr 0x%" PRIx64 " len %"
                  PRIu32 " outside guest memory", head, where, i, d->addr, d->len);
        return -1;
    }
    npfns = d->len / 4;
    if (sink_room(base, npfns)) {
        vb_range *out = s->out + base->out_stored;

        for (uint32_t k = 0; k < npfns; k++) {
            uint32_t raw;
            uint64_t pfn;

            memcpy(&raw, src + 4 * (size_t)k, 4);   /* each PFN read once */
            pfn = le32toh(raw);
            if (base->out_count > 0 && vb_ranges_extend(&out[base->out_count - 1], pfn, s->low, s->high)) {
                continue;
            }
            out[base->out_count++] = (vb_range){pfn << VB_PAGE_SHIFT, VB_PAGE_SIZE};
            vb_ranges_run_bounds(s->mem, pfn, &s->low, &s->high);
        }
    } else {
        base->fits = 0;
    }
    base->count += npfns;
    return 0;
}

/* EXTENTS: each device-readable descriptor is one range, checked for
 * inflate/deflate use; a bad one is refused, never stored. */
struct extent_sink {
    struct sink base;
    vb_range *out;
};

static int take_extent(struct sink *base, const vb_mem *mem, uint16_t head, const char *where,
                       uint32_t i, const struct desc *d, char *err, size_t errlen)
{
    struct extent_sink *s = (struct extent_sink *)base;
    const vb_range *mine;
    uint64_t end;
    int region;

    if (d->flags & VRING_DESC_F_WRITE) {
        vb_seterr(err, errlen, "head %u: %s %" PRIu32 " is device-writable (flags 0x%x)"
                  " in a buffer of device-readable ranges", head, where, i, d->flags);
        return -1;
    }
    if (!sink_room(base, 1)) {
        base->fits = 0;
        base->count++;
        return 0;
    }
    base->count++;
    if (d->len == 0) {
        sink_refuse(base, d->addr, d->len, VB_REFUSE_EMPTY);
        return 0;
    }
    if ((d->addr | d->len) & (VB_PAGE_SIZE - 1)) {
        sink_refuse(base, d->addr, d->len, VB_REFUSE_UNALIGNED);
        return 0;
    }
    end = d->addr + d->len;
    if (end < d->addr) {
        sink_refuse(base, d->addr, d->len, VB_REFUSE_WRAPS);
        return 0;
    }
    region = vb_mem_region_of(mem, d->addr, d->len);
    if (region < 0) {
        sink_refuse(base, d->addr, d->len, VB_REFUSE_OUTSIDE);
        return 0;
    }
    /* Against this buffer's ranges so far: a buffer holds few (Linux's
     * reporting buffers 32), and a refusal must name the offender. */
    mine = s->out + base->out_stored;
    for (uint32_t k = 0; k < base->out_count; k++) {
        if (d->addr < mine[k].gpa + mine[k].len && mine[k].gpa < end) {
            sink_refuse(base, d->addr, d->len, VB_REFUSE_OVERLAP);
            return 0;
        }
    }
    s->out[base->out_stored + base->out_count++] = (vb_range){d->addr, d->len};
    return 0;
}

/* Reporting and stats buffers: the descriptors themselves, all in one
 * direction.  Their addresses are not checked here (nothing is read through
 * them): the caller validates each one. */
struct desc_sink {
    struct sink base;
    vb_desc_range *out;
    int writable;        /* 1: every descriptor must be device-writable; 0: readable */
};

static int take_desc(struct sink *base, const vb_mem *mem, uint16_t head, const char *where,
                     uint32_t i, const struct desc *d, char *err, size_t errlen)
{
    struct desc_sink *s = (struct desc_sink *)base;
    int writable = (d->flags & VRING_DESC_F_WRITE) != 0;

    (void)mem;
    if (writable != s->writable) {
        vb_seterr(err, errlen, "head %u: %s %" PRIu32 " is device-%s (flags 0x%x) in a"
                  " buffer of device-%s descriptors", head, where, i,
                  writable ? "writable" : "readable", d->flags,
                  s->writable ? "writable" : "readable");
        return -1;
    }
    if (sink_room(base, 1)) {
        vb_desc_range *r = s->out + base->out_stored + base->out_count++;

        r->addr = d->addr;
        r->len = d->len;
        r->flags = d->flags;
    } else {
        base->fits = 0;
    }
    base->count++;
    return 0;
}

/*
 * Walks the chain starting at head and hands its descriptors to the sink.
 * Returns 0 when the chain is well formed (s->fits says whether its items
 * were all stored), -1 with err set when it is not.
 */
static int pop_one(const vb_vq *vq, const vb_mem *mem, uint16_t head,
                   struct sink *s, char *err, size_t errlen)
{
    const uint8_t *table = vq->desc;
    uint32_t table_size = vq->num;
    uint32_t i = head;
    uint32_t steps = 0;
    int in_indirect = 0;
    const char *where = "descriptor";
    struct desc d;

    for (;;) {
        if (++steps > table_size) {
            vb_seterr(err, errlen, "head %u: chain has more than %" PRIu32
                      " descriptors (%s table of %" PRIu32 "), a loop?", head, table_size,
                      in_indirect ? "indirect" : "ring", table_size);
            return -1;
        }
        read_desc(table, i, &d);

        if (d.flags & VRING_DESC_F_INDIRECT) {
            const uint8_t *ind;

            if (!vq->indirect) {
                vb_seterr(err, errlen, "head %u: %s %" PRIu32 " has the INDIRECT flag but"
                          " indirect descriptors were not negotiated", head, where, i);
                return -1;
            }
            if (in_indirect) {
                vb_seterr(err, errlen, "head %u: indirect descriptor %" PRIu32
                          " is itself INDIRECT (nested tables are not allowed)", head, i);
                return -1;
            }
            if (d.flags & VRING_DESC_F_NEXT) {
                vb_seterr(err, errlen, "head %u: descriptor %" PRIu32
                          " has both INDIRECT and NEXT (flags 0x%x)", head, i, d.flags);
                return -1;
            }
            if (d.len == 0 || d.len % DESC_SIZE != 0 || d.len / DESC_SIZE > VB_MAX_INDIRECT) {
                vb_seterr(err, errlen, "head %u: descriptor %" PRIu32 ": indirect table"
                          " length %" PRIu32 " is not a nonzero multiple of 16 up to %u"
                          " entries", head, i, d.len, VB_MAX_INDIRECT);
                return -1;
            }
            ind = vb_mem_gpa_to_host(mem, d.addr, d.len);
            if (ind == NULL) {
                vb_seterr(err, errlen, "head %u: descriptor %" PRIu32 ": indirect table"
                          " addr 0x%" PRIx64 " len %" PRIu32 " outside guest memory",
                          head, i, d.addr, d.len);
                return -1;
            }
            table = ind;
            table_size = d.len / DESC_SIZE;
            i = 0;
            steps = 0;
            in_indirect = 1;
            where = "indirect descriptor";
            continue;
        }
        if (s->take(s, mem, head, where, i, &d, err, errlen) < 0) {
            return -1;
        }
        if (!(d.flags & VRING_DESC_F_NEXT)) {
            return 0;
        }
        if (d.next >= table_size) {
            vb_seterr(err, errlen, "head %u: %s %" PRIu32 ": next %u out of range"
                      " (%s size %" PRIu32 ")", head, where, i, d.next,
                      in_indirect ? "indirect table" : "ring", table_size);
            return -1;
        }
        i = d.next;
    }
}

/*
 * Pops every available buffer (up to max_heads, whole buffers that fit in
 * the sink only).  counts[k], when not NULL, gets buffer k's item count.
 * Returns the number of buffers popped or -1 (nothing consumed).
 */
static int pop_buffers(vb_vq *vq, const vb_mem *mem, struct sink *s,
                       uint16_t *heads, uint32_t *counts, uint32_t max_heads,
                       char *err, size_t errlen)
{
    uint16_t last = vq->last_avail_idx;
    uint32_t popped = 0;
    int full = 0;

    s->stored = 0;
    s->out_stored = 0;
    s->refused = 0;
    if (!vq->ready) {
        vb_seterr(err, errlen, "queue is not set up");
        return -1;
    }
    for (;;) {
        /* Acquire: the ring entries and descriptors we read next were written
         * before the driver published this index. */
        uint16_t avail_idx = load16((uint8_t *)vq->avail + AVAIL_OFF_IDX, __ATOMIC_ACQUIRE);
        uint16_t ahead = (uint16_t)(avail_idx - last);

        if (ahead > vq->num) {
            vb_seterr(err, errlen, "avail idx %u is %u ahead of last_avail_idx %u"
                      " (ring size %" PRIu32 ")", avail_idx, ahead, last, vq->num);
            return -1;
        }
        while (last != avail_idx) {
            uint16_t head;

            if (popped >= max_heads) {
                full = 1;
                break;
            }
            head = load16(avail_ring(vq, last & (vq->num - 1)), __ATOMIC_RELAXED);
            if (head >= vq->num) {
                vb_seterr(err, errlen, "head %u out of range (ring size %" PRIu32
                          ") at avail slot %u", head, vq->num, last);
                return -1;
            }
            s->count = 0;
            s->out_count = 0;
            s->buf_refused = 0;
            s->fits = 1;
            if (pop_one(vq, mem, head, s, err, errlen) < 0) {
                return -1;
            }
            if (s->count > s->capacity) {
                vb_seterr(err, errlen, "head %u: buffer holds %" PRIu64 " %s, more than"
                          " the %" PRIu32 " this queue takes per pop", head, s->count,
                          s->items, s->capacity);
                return -1;
            }
            if (!s->fits) {
                /* Whole buffers only: leave it for the next call. */
                full = 1;
                break;
            }
            if (counts != NULL) {
                counts[popped] = (uint32_t)s->count;
            }
            heads[popped++] = head;
            s->stored += (uint32_t)s->count;
            s->out_stored += s->out_count;
            if (s->buf_refused != 0) {
                if (s->refused == 0) {
                    s->first = s->buf_first;
                    s->why = s->buf_why;
                }
                s->refused += s->buf_refused;
            }
            last++;
        }
        if (vq->event_idx) {
            /* Tell the driver to kick once it makes buffer `last` available,
             * then look again: a buffer added before it could see this
             * store would otherwise go unnoticed (virtio 1.x 2.7.10). */
            store16(avail_event_ptr(vq), last, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
        }
        if (full || !vq->event_idx ||
            load16((uint8_t *)vq->avail + AVAIL_OFF_IDX, __ATOMIC_ACQUIRE) == avail_idx) {
            break;
        }
    }
    vq->last_avail_idx = last;
    return (int)popped;
}

static void batch_of(const struct sink *s, int popped, vb_batch *batch)
{
    memset(batch, 0, sizeof(*batch));
    if (popped > 0) {
        batch->n_ranges = s->out_stored;
        batch->items = s->stored;
        batch->refused = s->refused;
        batch->first_refused_gpa = s->first.gpa;
        batch->first_refused_len = s->first.len;
        batch->first_refused_why = s->refused ? s->why : VB_REFUSE_NONE;
    }
}

int vb_vq_pop_pfn32(vb_vq *vq, const vb_mem *mem, vb_range *ranges, uint32_t max_items,
                    vb_batch *batch, uint16_t *heads, uint32_t max_heads, char *err, size_t errlen)
{
    struct pfn_sink s = {
        .base = {.take = take_pfns, .items = "PFNs", .capacity = max_items},
        .out = ranges,
        .mem = mem,
    };
    int popped = pop_buffers(vq, mem, &s.base, heads, NULL, max_heads, err, errlen);

    batch_of(&s.base, popped, batch);
    return popped;
}

int vb_vq_pop_extents(vb_vq *vq, const vb_mem *mem, vb_range *ranges, uint32_t max_items,
                      vb_batch *batch, uint16_t *heads, uint32_t max_heads, char *err, size_t errlen)
{
    struct extent_sink s = {
        .base = {.take = take_extent, .items = "ranges", .capacity = max_items},
        .out = ranges,
    };
    int popped = pop_buffers(vq, mem, &s.base, heads, NULL, max_heads, err, errlen);

    batch_of(&s.base, popped, batch);
    return popped;
}

int vb_vq_pop_ranges(vb_vq *vq, const vb_mem *mem, int writable,
                     vb_desc_range *ranges, uint32_t max_ranges, uint32_t *n_ranges,
                     uint16_t *heads, uint32_t *counts, uint32_t max_heads,
                     char *err, size_t errlen)
{
    struct desc_sink s = {
        .base = {.take = take_desc, .items = "descriptors", .capacity = max_ranges},
        .out = ranges,
        .writable = writable != 0,
    };
    int popped = pop_buffers(vq, mem, &s.base, heads, counts, max_heads, err, errlen);

    *n_ranges = popped > 0 ? s.base.stored : 0;
    return popped;
}

void vb_vq_push_used(vb_vq *vq, const uint16_t *heads, const uint32_t *lens, uint32_t n)
{
    uint32_t k;
    uint8_t *ring = (uint8_t *)vq->used + USED_OFF_RING;

    if (!vq->ready || n == 0) {
        return;
    }
    for (k = 0; k < n; k++) {
        uint8_t *elem = ring + USED_ELEM_SIZE * (size_t)((uint16_t)(vq->used_idx + k) & (vq->num - 1));

        store32(elem, heads[k]);
        store32(elem + 4, lens != NULL ? lens[k] : 0);
    }
    vq->used_idx = (uint16_t)(vq->used_idx + n);
    /* Release: the elements are visible before the index that covers them. */
    store16((uint8_t *)vq->used + USED_OFF_IDX, vq->used_idx, __ATOMIC_RELEASE);
}

/* virtio 1.x 2.7.10.1: interrupt iff new_idx passed event since old. */
static inline int vring_need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

int vb_vq_should_signal(vb_vq *vq)
{
    uint16_t old, new_idx, event;
    int was_valid;

    if (!vq->ready) {
        return 0;
    }
    /* Our used->idx store must be ordered before reading the driver's
     * suppression state, or both sides can decide to stay quiet. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!vq->event_idx) {
        uint16_t flags = load16((uint8_t *)vq->avail + AVAIL_OFF_FLAGS, __ATOMIC_RELAXED);

        return !(flags & VRING_AVAIL_F_NO_INTERRUPT);
    }
    event = load16(used_event_ptr(vq), __ATOMIC_RELAXED);
    was_valid = vq->signalled_used_valid;
    old = vq->signalled_used;
    new_idx = vq->used_idx;
    vq->signalled_used = new_idx;
    vq->signalled_used_valid = 1;
    return !was_valid || vring_need_event(event, new_idx, old);
}

int vb_vq_pending(const vb_vq *vq)
{
    uint16_t avail_idx, ahead;

    if (!vq->ready) {
        return 0;
    }
    avail_idx = load16((uint8_t *)vq->avail + AVAIL_OFF_IDX, __ATOMIC_ACQUIRE);
    ahead = (uint16_t)(avail_idx - vq->last_avail_idx);
    return ahead > vq->num ? -1 : (int)ahead;
}
