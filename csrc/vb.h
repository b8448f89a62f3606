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
} vb_discard_stats;

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

/* CDEF-END */

#endif
