/*
 * Split virtqueue accessor (virtio 1.x section 2.7), device side.
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

/* Where pop_one puts a buffer's PFNs, and how much room is left. */
struct pfn_sink {
    uint32_t *out;       /* next free slot */
    uint32_t room;       /* free slots left in this call */
    uint64_t count;      /* PFNs in this buffer so far */
    int fits;            /* still copying; 0 once the buffer overflowed room */
};

static void sink_take(struct pfn_sink *s, const uint8_t *src, uint32_t npfns)
{
    if (s->fits && s->count + npfns <= s->room) {
        uint32_t *dst = s->out + s->count;

        memcpy(dst, src, (size_t)npfns * 4);
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
        for (uint32_t k = 0; k < npfns; k++) {
            dst[k] = le32toh(dst[k]);
        }
#endif
    } else {
        s->fits = 0;
    }
    s->count += npfns;
}

/*
 * Walks the chain starting at head and appends its PFNs to the sink.
 * Returns 0 when the chain is well formed (s->fits says whether its PFNs
 * were all stored), -1 with err set when it is not.
 */
static int pop_one(const vb_vq *vq, const vb_mem *mem, uint16_t head,
                   struct pfn_sink *s, char *err, size_t errlen)
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
        if (d.flags & VRING_DESC_F_WRITE) {
            vb_seterr(err, errlen, "head %u: %s %" PRIu32 " is device-writable (flags 0x%x)"
                      " in an inflate/deflate buffer", head, where, i, d.flags);
            return -1;
        }
        if (d.len % 4 != 0) {
            vb_seterr(err, errlen, "head %u: %s %" PRIu32 ": len %" PRIu32
                      " is not a multiple of 4 (le32 PFNs)", head, where, i, d.len);
            return -1;
        }
        if (d.len != 0) {
            const uint8_t *src = vb_mem_gpa_to_host(mem, d.addr, d.len);

            if (src == NULL) {
                vb_seterr(err, errlen, "head %u: %s %" PRIu32 ": addr 0x%" PRIx64 " len %"
                          PRIu32 " outside guest memory", head, where, i, d.addr, d.len);
                return -1;
            }
            sink_take(s, src, d.len / 4);
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

int vb_vq_pop_pfns(vb_vq *vq, const vb_mem *mem,
                   uint32_t *pfns, uint32_t max_pfns, uint32_t *n_pfns,
                   uint16_t *heads, uint32_t max_heads,
                   char *err, size_t errlen)
{
    uint16_t last = vq->last_avail_idx;
    uint32_t popped = 0, used_pfns = 0;
    int full = 0;

    *n_pfns = 0;
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
            struct pfn_sink s;

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
            s = (struct pfn_sink){
                .out = pfns + used_pfns, .room = max_pfns - used_pfns, .count = 0, .fits = 1,
            };
            if (pop_one(vq, mem, head, &s, err, errlen) < 0) {
                return -1;
            }
            if (s.count > max_pfns) {
                vb_seterr(err, errlen, "head %u: buffer holds %" PRIu64 " PFNs, more than"
                          " the %" PRIu32 " this queue takes per pop", head, s.count, max_pfns);
                return -1;
            }
            if (!s.fits) {
                /* Whole buffers only: leave it for the next call. */
                full = 1;
                break;
            }
            heads[popped++] = head;
            used_pfns += (uint32_t)s.count;
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
    *n_pfns = used_pfns;
    return (int)popped;
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
