// SPDX-License-Identifier: GPL-2.0
/*
 * vhostballoon_guest: a virtio-balloon driver that inflates by ranges.
 *
 * It binds the virtio balloon (device id 5) in place of virtio_balloon and
 * gives the user what that driver gives: MUST_TELL_HOST, the statistics
 * queue, deflate on OOM, free page reporting, `actual` in the config space,
 * balloon_inflate/balloon_deflate in /proc/vmstat.
 *
 * When the device offers VIRTIO_BALLOON_F_RANGES (bit 60, this project's
 * protocol/range-balloon.md) it inflates highest order first: blocks of
 * 2^max_order pages down to single pages, each block one descriptor of a
 * range-inflate buffer, each order on its own list. It deflates lowest
 * order first and splits a block only when less than all of it must go
 * back. Single pages travel by PFN on the classic queues, as without the
 * feature, when the driver balloons 4 KiB pages exactly as virtio_balloon.
 *
 * Ballooned pages are unmovable allocations, not balloon-compaction pages:
 * see README.md for why.
 */

#include <linux/debugfs.h>
#include <linux/delay.h>
#include <linux/gfp.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/oom.h>
#include <linux/page_reporting.h>
#include <linux/scatterlist.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/version.h>
#include <linux/virtio.h>
#include <linux/virtio_balloon.h>
#include <linux/virtio_config.h>
#include <linux/vmstat.h>
#include <linux/wait.h>
#include <linux/workqueue.h>

/* The balloon's unit is 4 KiB (virtio 1.2, 5.5.6); this driver maps one
 * Linux page to one balloon page and so supports 4 KiB-page kernels only. */
#if PAGE_SHIFT != VIRTIO_BALLOON_PFN_SHIFT
#error "vhostballoon_guest supports only 4 KiB pages"
#endif

/* protocol/range-balloon.md: the device has range-inflate/range-deflate. */
#define VBG_F_RANGES 60

/* The largest order the buddy allocator hands out: MAX_ORDER became
 * inclusive in 6.4 and was renamed MAX_PAGE_ORDER in 6.8. */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 8, 0)
#define VBG_MAX_ORDER MAX_PAGE_ORDER
#elif LINUX_VERSION_CODE >= KERNEL_VERSION(6, 4, 0)
#define VBG_MAX_ORDER MAX_ORDER
#else
#define VBG_MAX_ORDER (MAX_ORDER - 1)
#endif
#define VBG_ORDERS (VBG_MAX_ORDER + 1)

/* PFNs per inflateq/deflateq buffer, as virtio_balloon
 * (VIRTIO_BALLOON_ARRAY_PFNS_MAX). */
#define VBG_PFNS_PER_BUF 256
/* Ranges per buffer at most; each takes a descriptor, and without
 * INDIRECT_DESC (QEMU's generic vhost-user device does not offer it) a
 * buffer must fit the ring, so the ring size usually decides. */
#define VBG_RANGES_PER_BUF 256
/* Buffers one run of the size work sends before it requeues itself, so
 * that other work on the shared workqueue gets its turn. */
#define VBG_BUFFERS_PER_RUN 64
/* OOM deflate: at most this many buffers per notification (a split may
 * leave the pages to return on several lists). */
#define VBG_OOM_BUFFERS 8

/* page_private() of a block's first page while the block is in the
 * balloon: its pages were split (split_page) and each is freed alone. */
#define VBG_BLOCK_SPLIT 1UL

/*
 * Every allocation: no emergency reserves, no OOM killer, no warning, at
 * most one light round of reclaim and async compaction (__GFP_NORETRY, no
 * __GFP_RETRY_MAYFAIL). Unmovable (no __GFP_MOVABLE): these pages cannot
 * be migrated, so they must not sit in movable pageblocks, ZONE_MOVABLE or
 * CMA. Not compound, so that a block can be split when part of it goes
 * back.
 */
#define VBG_GFP (GFP_HIGHUSER | __GFP_NOMEMALLOC | __GFP_NORETRY | __GFP_NOWARN)

static unsigned int max_order = 9;
module_param(max_order, uint, 0644);
MODULE_PARM_DESC(max_order, "largest block inflated with the range feature, as an order of 4 KiB pages (default 9: 2 MiB)");

static unsigned int oom_pages = 256;
module_param(oom_pages, uint, 0644);
MODULE_PARM_DESC(oom_pages, "4 KiB pages to return per OOM notification (default 256, as virtio_balloon)");

enum vbg_vq {
	VBG_VQ_INFLATE,
	VBG_VQ_DEFLATE,
	VBG_VQ_STATS,		/* VIRTIO_BALLOON_F_STATS_VQ */
	VBG_VQ_FREE_PAGE,	/* VIRTIO_BALLOON_F_FREE_PAGE_HINT: never negotiated */
	VBG_VQ_REPORTING,	/* VIRTIO_BALLOON_F_REPORTING */
	VBG_VQ_RANGE_INFLATE,	/* VBG_F_RANGES */
	VBG_VQ_RANGE_DEFLATE,	/* VBG_F_RANGES */
	VBG_VQ_MAX
};

/* One entry of a buffer in flight: a block, or the part of one that goes. */
struct vbg_block {
	struct page *page;
	unsigned int npages;
	unsigned int order;	/* of a whole, unsplit block */
	bool split;		/* its pages are freed one by one */
};

struct vbg {
	struct virtio_device *vdev;
	struct virtqueue *vqs[VBG_VQ_MAX];
	bool ranges;		/* VBG_F_RANGES negotiated */
	bool deflate_on_oom;	/* ballooned pages stay in the managed count */

	struct work_struct size_work;
	struct work_struct stats_work;
	spinlock_t stop_lock;	/* orders queueing work against removal */
	bool stopping;

	wait_queue_head_t acked;

	/* Held across a whole buffer: allocate, tell the host, account. */
	struct mutex lock;
	u32 num_pages;		/* in the balloon, 4 KiB pages */
	struct list_head blocks[VBG_ORDERS];
	unsigned long held[VBG_ORDERS];	/* blocks on each list */

	/* Counted since probe, shown in debugfs. */
	u64 inflated_blocks[VBG_ORDERS];
	u64 alloc_failures[VBG_ORDERS];
	u64 pfn_pages_in, range_pages_in, pfn_pages_out, range_pages_out;
	u64 pfn_buffers, range_buffers;
	u64 splits;
	u64 oom_pages_returned;

	unsigned int range_cap;	/* ranges per buffer */
	struct vbg_block *batch;	/* max(VBG_PFNS_PER_BUF, range_cap) */
	struct scatterlist *sgs;	/* range_cap */
	__virtio32 pfns[VBG_PFNS_PER_BUF];

	struct virtio_balloon_stat stats[VIRTIO_BALLOON_S_NR];
	unsigned long events[NR_VM_EVENT_ITEMS];

	struct notifier_block oom_nb;
	bool oom_registered;
	struct page_reporting_dev_info pr_dev_info;
	bool reporting_registered;

	struct dentry *debugfs;
};

static unsigned int vbg_top_order(const struct vbg *vb)
{
	return vb->ranges ? min_t(unsigned int, READ_ONCE(max_order), VBG_MAX_ORDER) : 0;
}

/* -- talking to the device ---------------------------------------------- */

static void vbg_ack(struct virtqueue *vq)
{
	struct vbg *vb = vq->vdev->priv;

	wake_up(&vb->acked);
}

/*
 * Hands one buffer to the device and waits until the device has used it.
 * The queue is empty on entry (one buffer in flight per queue), so the
 * buffer fits when it has no more entries than the ring. -EIO: the queue is
 * broken (device gone or misbehaving); the buffer never comes back.
 */
static int vbg_send(struct vbg *vb, struct virtqueue *vq, struct scatterlist *sg,
		    unsigned int nents, bool device_writes, gfp_t gfp)
{
	unsigned int len;
	int err;

	if (device_writes)
		err = virtqueue_add_inbuf(vq, sg, nents, vb, gfp);
	else
		err = virtqueue_add_outbuf(vq, sg, nents, vb, gfp);
	if (err) {
		dev_warn_ratelimited(&vb->vdev->dev, "queue %s: cannot add a buffer of %u entries: %d\n",
				     vq->name, nents, err);
		return err;
	}
	virtqueue_kick(vq);
	wait_event(vb->acked, virtqueue_get_buf(vq, &len) || virtqueue_is_broken(vq));
	if (virtqueue_is_broken(vq)) {
		dev_warn_once(&vb->vdev->dev, "queue %s is broken: the balloon stops\n", vq->name);
		return -EIO;
	}
	return 0;
}

static s64 vbg_towards_target(struct vbg *vb)
{
	u32 target;

	virtio_cread_le(vb->vdev, struct virtio_balloon_config, num_pages, &target);
	return (s64)target - READ_ONCE(vb->num_pages);
}

static void vbg_write_actual(struct vbg *vb)
{
	u32 actual = vb->num_pages;

	virtio_cwrite_le(vb->vdev, struct virtio_balloon_config, actual, &actual);
}

/* -- the balloon's lists ------------------------------------------------- */

/*
 * Puts [pfn, pfn + npages) on the lists as naturally aligned blocks, each
 * as large as alignment and length allow. The pages are split ones (each
 * has its own reference).
 */
static void vbg_hold_split_span(struct vbg *vb, unsigned long pfn, unsigned long npages)
{
	unsigned long end = pfn + npages;

	while (pfn < end) {
		unsigned int order = pfn ? min_t(unsigned int, __ffs(pfn), VBG_MAX_ORDER) : VBG_MAX_ORDER;
		struct page *page = pfn_to_page(pfn);

		while ((1UL << order) > end - pfn)
			order--;
		set_page_private(page, order ? VBG_BLOCK_SPLIT : 0);
		list_add(&page->lru, &vb->blocks[order]);
		vb->held[order]++;
		pfn += 1UL << order;
	}
}

static void vbg_hold_block(struct vbg *vb, const struct vbg_block *b)
{
	if (b->split) {
		vbg_hold_split_span(vb, page_to_pfn(b->page), b->npages);
		return;
	}
	set_page_private(b->page, 0);
	list_add(&b->page->lru, &vb->blocks[b->order]);
	vb->held[b->order]++;
}

static void vbg_free_block(const struct vbg_block *b)
{
	unsigned int i;

	set_page_private(b->page, 0);
	if (!b->split) {
		__free_pages(b->page, b->order);
		return;
	}
	for (i = 0; i < b->npages; i++)
		__free_page(nth_page(b->page, i));
}

/* Takes the first block of a list off it. */
static struct vbg_block vbg_take_block(struct vbg *vb, unsigned int order)
{
	struct page *page = list_first_entry(&vb->blocks[order], struct page, lru);
	struct vbg_block b = {
		.page = page,
		.npages = 1U << order,
		.order = order,
		.split = page_private(page) == VBG_BLOCK_SPLIT,
	};

	list_del(&page->lru);
	vb->held[order]--;
	return b;
}

/*
 * Less than all of a block must go back: split it, return its first npages
 * pages as one range and keep the rest on the lists as aligned blocks.
 */
static struct vbg_block vbg_split_block(struct vbg *vb, unsigned int order, unsigned int npages)
{
	struct vbg_block b = vbg_take_block(vb, order);

	if (!b.split)
		split_page(b.page, order);
	set_page_private(b.page, 0);
	vbg_hold_split_span(vb, page_to_pfn(b.page) + npages, (1UL << order) - npages);
	vb->splits++;
	b.npages = npages;
	b.split = true;
	return b;
}

/* The device has the pages of a used inflate buffer: account for them. */
static void vbg_account_inflated(struct vbg *vb, unsigned int n, bool by_range)
{
	unsigned int i, pages = 0;

	for (i = 0; i < n; i++) {
		struct vbg_block *b = &vb->batch[i];

		vbg_hold_block(vb, b);
		vb->inflated_blocks[b->order]++;
		if (!vb->deflate_on_oom)
			adjust_managed_page_count(b->page, -(long)b->npages);
		pages += b->npages;
	}
	vb->num_pages += pages;
	if (by_range) {
		vb->range_pages_in += pages;
		vb->range_buffers++;
	} else {
		vb->pfn_pages_in += pages;
		vb->pfn_buffers++;
	}
#ifdef CONFIG_MEMORY_BALLOON
	count_vm_events(BALLOON_INFLATE, pages);
#endif
}

/* The device has used a deflate buffer: the pages are the guest's again. */
static void vbg_release_deflated(struct vbg *vb, unsigned int n, bool by_range)
{
	unsigned int i, pages = 0;

	for (i = 0; i < n; i++) {
		struct vbg_block *b = &vb->batch[i];

		if (!vb->deflate_on_oom)
			adjust_managed_page_count(b->page, b->npages);
		pages += b->npages;
		vbg_free_block(b);
	}
	vb->num_pages -= pages;
	if (by_range) {
		vb->range_pages_out += pages;
		vb->range_buffers++;
	} else {
		vb->pfn_pages_out += pages;
		vb->pfn_buffers++;
	}
#ifdef CONFIG_MEMORY_BALLOON
	count_vm_events(BALLOON_DEFLATE, pages);
#endif
}

static void vbg_fill_pfns(struct vbg *vb, unsigned int n, struct scatterlist *sg)
{
	unsigned int i;

	for (i = 0; i < n; i++)
		vb->pfns[i] = cpu_to_virtio32(vb->vdev, page_to_pfn(vb->batch[i].page));
	sg_init_one(sg, vb->pfns, n * sizeof(vb->pfns[0]));
}

static void vbg_fill_ranges(struct vbg *vb, unsigned int n)
{
	unsigned int i;

	sg_init_table(vb->sgs, n);
	for (i = 0; i < n; i++)
		sg_set_page(&vb->sgs[i], vb->batch[i].page, vb->batch[i].npages << PAGE_SHIFT, 0);
}

/* -- inflate ------------------------------------------------------------- */

/*
 * One range-inflate buffer of blocks of order >= 1, highest order first.
 * An order that failed once in this run of the work is not tried again
 * (failed_orders), so the fallback walks down order by order. Returns the
 * pages inflated, 0 when no block of order >= 1 could be had, or an error.
 */
static long vbg_inflate_ranges(struct vbg *vb, u32 want, unsigned long *failed_orders)
{
	unsigned int order = vbg_top_order(vb);
	unsigned int n = 0, pages = 0;
	int err;

	while (n < vb->range_cap) {
		struct page *page;

		while (order > 0 && ((1U << order) > want - pages || test_bit(order, failed_orders)))
			order--;
		if (order == 0)
			break;
		page = alloc_pages(VBG_GFP, order);
		if (!page) {
			__set_bit(order, failed_orders);
			vb->alloc_failures[order]++;
			continue;
		}
		vb->batch[n++] = (struct vbg_block){ .page = page, .npages = 1U << order, .order = order };
		pages += 1U << order;
	}
	if (!n)
		return 0;
	vbg_fill_ranges(vb, n);
	err = vbg_send(vb, vb->vqs[VBG_VQ_RANGE_INFLATE], vb->sgs, n, false, GFP_KERNEL);
	if (err) {
		while (n--)
			vbg_free_block(&vb->batch[n]);
		return err;
	}
	vbg_account_inflated(vb, n, true);
	return pages;
}

/* One inflateq buffer of single pages, as virtio_balloon fills it. */
static long vbg_inflate_pfns(struct vbg *vb, u32 want)
{
	unsigned int n = 0, limit = min_t(u32, want, VBG_PFNS_PER_BUF);
	struct scatterlist sg;
	int err;

	while (n < limit) {
		struct page *page = alloc_page(VBG_GFP);

		if (!page) {
			vb->alloc_failures[0]++;
			break;
		}
		vb->batch[n++] = (struct vbg_block){ .page = page, .npages = 1 };
	}
	if (!n)
		return 0;
	vbg_fill_pfns(vb, n, &sg);
	err = vbg_send(vb, vb->vqs[VBG_VQ_INFLATE], &sg, 1, false, GFP_KERNEL);
	if (err) {
		while (n--)
			vbg_free_block(&vb->batch[n]);
		return err;
	}
	vbg_account_inflated(vb, n, false);
	return n;
}

static long vbg_inflate(struct vbg *vb, u32 want, unsigned long *failed_orders)
{
	long done = 0;

	mutex_lock(&vb->lock);
	if (vbg_top_order(vb) > 0 && want > 1)
		done = vbg_inflate_ranges(vb, want, failed_orders);
	if (!done)
		done = vbg_inflate_pfns(vb, want);
	if (done > 0)
		vbg_write_actual(vb);
	mutex_unlock(&vb->lock);
	return done;
}

/* -- deflate ------------------------------------------------------------- */

/* One deflateq buffer of single pages from the order-0 list. */
static long vbg_deflate_pfns(struct vbg *vb, u32 want)
{
	unsigned int n = 0, limit = min_t(u32, want, VBG_PFNS_PER_BUF);
	struct scatterlist sg;
	int err;

	while (n < limit && !list_empty(&vb->blocks[0]))
		vb->batch[n++] = vbg_take_block(vb, 0);
	if (!n)
		return 0;
	vbg_fill_pfns(vb, n, &sg);
	err = vbg_send(vb, vb->vqs[VBG_VQ_DEFLATE], &sg, 1, false, GFP_KERNEL);
	if (err) {
		while (n--)
			vbg_hold_block(vb, &vb->batch[n]);
		return err;
	}
	vbg_release_deflated(vb, n, false);
	return n;
}

/*
 * One range-deflate buffer, lowest order first; when the next block is
 * larger than what is still wanted, it is split and only its first part
 * goes back.
 */
static long vbg_deflate_ranges(struct vbg *vb, u32 want)
{
	unsigned int order = 1, n = 0, pages = 0;
	int err;

	while (n < vb->range_cap && pages < want && order < VBG_ORDERS) {
		if (list_empty(&vb->blocks[order])) {
			order++;
			continue;
		}
		if ((1U << order) <= want - pages) {
			vb->batch[n++] = vbg_take_block(vb, order);
			pages += 1U << order;
			continue;
		}
		vb->batch[n++] = vbg_split_block(vb, order, want - pages);
		pages = want;
	}
	if (!n)
		return 0;
	vbg_fill_ranges(vb, n);
	err = vbg_send(vb, vb->vqs[VBG_VQ_RANGE_DEFLATE], vb->sgs, n, false, GFP_KERNEL);
	if (err) {
		while (n--)
			vbg_hold_block(vb, &vb->batch[n]);
		return err;
	}
	vbg_release_deflated(vb, n, true);
	return pages;
}

/*
 * One buffer's worth of pages back to the guest, lowest order first: the
 * device is told (the buffer is used) before any page is freed, as
 * MUST_TELL_HOST requires; without it the order is the same. Returns the
 * pages freed, 0 when the balloon is empty, or an error.
 */
static long vbg_deflate(struct vbg *vb, u32 want)
{
	long done;

	if (!want)
		return 0;
	mutex_lock(&vb->lock);
	if (!list_empty(&vb->blocks[0]) || !vb->ranges)
		done = vbg_deflate_pfns(vb, want);
	else
		done = vbg_deflate_ranges(vb, want);
	if (done > 0)
		vbg_write_actual(vb);
	mutex_unlock(&vb->lock);
	return done;
}

/* -- work ---------------------------------------------------------------- */

static void vbg_queue(struct vbg *vb, struct work_struct *work)
{
	unsigned long flags;

	spin_lock_irqsave(&vb->stop_lock, flags);
	if (!vb->stopping)
		queue_work(system_freezable_wq, work);
	spin_unlock_irqrestore(&vb->stop_lock, flags);
}

static void vbg_size_work(struct work_struct *work)
{
	struct vbg *vb = container_of(work, struct vbg, size_work);
	unsigned long failed_orders = 0;
	unsigned int buffers;
	s64 diff;
	long done;

	BUILD_BUG_ON(VBG_ORDERS > BITS_PER_LONG);
	for (buffers = 0; buffers < VBG_BUFFERS_PER_RUN; buffers++) {
		diff = vbg_towards_target(vb);
		if (!diff)
			return;
		if (diff > 0)
			done = vbg_inflate(vb, min_t(s64, diff, U32_MAX), &failed_orders);
		else
			done = vbg_deflate(vb, min_t(s64, -diff, U32_MAX));
		if (done < 0)
			return;	/* the device is broken: nothing more can be done */
		if (!done) {
			if (diff < 0)
				return;	/* nothing left to give back */
			dev_info_ratelimited(&vb->vdev->dev, "out of puff: cannot get a page (%lld to go)\n", diff);
			msleep(200);	/* as virtio_balloon: let reclaim make progress */
			break;
		}
		cond_resched();
	}
	if (vbg_towards_target(vb))
		vbg_queue(vb, &vb->size_work);
}

static void vbg_config_changed(struct virtio_device *vdev)
{
	vbg_queue(vdev->priv, &((struct vbg *)vdev->priv)->size_work);
}

/* -- statistics ---------------------------------------------------------- */

static void vbg_stat(struct vbg *vb, unsigned int *idx, u16 tag, u64 val)
{
	if (*idx >= ARRAY_SIZE(vb->stats))
		return;
	vb->stats[*idx].tag = cpu_to_virtio16(vb->vdev, tag);
	vb->stats[*idx].val = cpu_to_virtio64(vb->vdev, val);
	(*idx)++;
}

#define pages_to_bytes(x) ((u64)(x) << PAGE_SHIFT)

/* The tags virtio_balloon sends on the same kernel, with the same values. */
static unsigned int vbg_update_stats(struct vbg *vb)
{
	unsigned long *ev = vb->events;
	unsigned int idx = 0;
	struct sysinfo si;

#ifdef CONFIG_VM_EVENT_COUNTERS
	all_vm_events(ev);
	vbg_stat(vb, &idx, VIRTIO_BALLOON_S_SWAP_IN, pages_to_bytes(ev[PSWPIN]));
	vbg_stat(vb, &idx, VIRTIO_BALLOON_S_SWAP_OUT, pages_to_bytes(ev[PSWPOUT]));
	vbg_stat(vb, &idx, VIRTIO_BALLOON_S_MAJFLT, ev[PGMAJFAULT]);
	vbg_stat(vb, &idx, VIRTIO_BALLOON_S_MINFLT, ev[PGFAULT]);
#ifdef VIRTIO_BALLOON_S_OOM_KILL
	{
		u64 stall = ev[ALLOCSTALL_NORMAL] + ev[ALLOCSTALL_MOVABLE];

#ifdef CONFIG_ZONE_DMA
		stall += ev[ALLOCSTALL_DMA];
#endif
#ifdef CONFIG_ZONE_DMA32
		stall += ev[ALLOCSTALL_DMA32];
#endif
#ifdef CONFIG_HIGHMEM
		stall += ev[ALLOCSTALL_HIGH];
#endif
#ifdef CONFIG_ZONE_DEVICE
		stall += ev[ALLOCSTALL_DEVICE];
#endif
		vbg_stat(vb, &idx, VIRTIO_BALLOON_S_OOM_KILL, ev[OOM_KILL]);
		vbg_stat(vb, &idx, VIRTIO_BALLOON_S_ALLOC_STALL, stall);
		vbg_stat(vb, &idx, VIRTIO_BALLOON_S_ASYNC_SCAN, pages_to_bytes(ev[PGSCAN_KSWAPD]));
		vbg_stat(vb, &idx, VIRTIO_BALLOON_S_DIRECT_SCAN, pages_to_bytes(ev[PGSCAN_DIRECT]));
		vbg_stat(vb, &idx, VIRTIO_BALLOON_S_ASYNC_RECLAIM, pages_to_bytes(ev[PGSTEAL_KSWAPD]));
		vbg_stat(vb, &idx, VIRTIO_BALLOON_S_DIRECT_RECLAIM, pages_to_bytes(ev[PGSTEAL_DIRECT]));
	}
#endif
#ifdef CONFIG_HUGETLB_PAGE
	vbg_stat(vb, &idx, VIRTIO_BALLOON_S_HTLB_PGALLOC, ev[HTLB_BUDDY_PGALLOC]);
	vbg_stat(vb, &idx, VIRTIO_BALLOON_S_HTLB_PGFAIL, ev[HTLB_BUDDY_PGALLOC_FAIL]);
#endif
#endif
	si_meminfo(&si);
	vbg_stat(vb, &idx, VIRTIO_BALLOON_S_MEMFREE, pages_to_bytes(si.freeram));
	vbg_stat(vb, &idx, VIRTIO_BALLOON_S_MEMTOT, pages_to_bytes(si.totalram));
	vbg_stat(vb, &idx, VIRTIO_BALLOON_S_AVAIL, pages_to_bytes(si_mem_available()));
	vbg_stat(vb, &idx, VIRTIO_BALLOON_S_CACHES, pages_to_bytes(global_node_page_state(NR_FILE_PAGES)));
	return idx;
}

/* Gives the device a stats buffer with fresh numbers. */
static void vbg_post_stats(struct vbg *vb)
{
	struct scatterlist sg;
	unsigned int n = vbg_update_stats(vb);
	int err;

	sg_init_one(&sg, vb->stats, sizeof(vb->stats[0]) * n);
	err = virtqueue_add_outbuf(vb->vqs[VBG_VQ_STATS], &sg, 1, vb, GFP_KERNEL);
	if (err) {
		dev_warn_ratelimited(&vb->vdev->dev, "cannot add the stats buffer: %d\n", err);
		return;
	}
	virtqueue_kick(vb->vqs[VBG_VQ_STATS]);
}

/*
 * The device holds the one stats buffer and returns it when it wants fresh
 * numbers; the driver then posts it again, refilled.
 */
static void vbg_stats_request(struct virtqueue *vq)
{
	struct vbg *vb = vq->vdev->priv;

	vbg_queue(vb, &vb->stats_work);
}

static void vbg_stats_work(struct work_struct *work)
{
	struct vbg *vb = container_of(work, struct vbg, stats_work);
	unsigned int len;

	if (virtqueue_get_buf(vb->vqs[VBG_VQ_STATS], &len))
		vbg_post_stats(vb);
}

/* -- OOM and free page reporting ----------------------------------------- */

static int vbg_oom_notify(struct notifier_block *nb, unsigned long unused, void *parm)
{
	struct vbg *vb = container_of(nb, struct vbg, oom_nb);
	unsigned long *freed = parm;
	u32 want = min(READ_ONCE(oom_pages), READ_ONCE(vb->num_pages));
	unsigned int buffers;
	long done;

	for (buffers = 0; want && buffers < VBG_OOM_BUFFERS; buffers++) {
		done = vbg_deflate(vb, want);
		if (done <= 0)
			break;
		*freed += done;
		want -= done;
		vb->oom_pages_returned += done;
	}
	return NOTIFY_OK;
}

static int vbg_report(struct page_reporting_dev_info *pr, struct scatterlist *sg, unsigned int nents)
{
	struct vbg *vb = container_of(pr, struct vbg, pr_dev_info);

	/* The device writes nothing, but reporting buffers are device-writable
	 * (virtio 1.2, 5.5.6.6), as virtio_balloon posts them. */
	return vbg_send(vb, vb->vqs[VBG_VQ_REPORTING], sg, nents, true, GFP_NOWAIT | __GFP_NOWARN);
}

/* -- debugfs ------------------------------------------------------------- */

static int vbg_orders_show(struct seq_file *m, void *unused)
{
	struct vbg *vb = m->private;
	unsigned int order, top;

	mutex_lock(&vb->lock);
	top = vb->ranges ? VBG_MAX_ORDER : 0;
	seq_printf(m, "ranges %s\nmax_order %u\nmigratetype unmovable\nactual_pages %u\n",
		   vb->ranges ? "on" : "off", vbg_top_order(vb), vb->num_pages);
	seq_puts(m, "order blocks pages inflated_blocks alloc_failures\n");
	for (order = 0; order <= top; order++)
		seq_printf(m, "%u %lu %lu %llu %llu\n", order, vb->held[order], vb->held[order] << order,
			   vb->inflated_blocks[order], vb->alloc_failures[order]);
	seq_printf(m, "pfn_pages_inflated %llu\nrange_pages_inflated %llu\n", vb->pfn_pages_in, vb->range_pages_in);
	seq_printf(m, "pfn_pages_deflated %llu\nrange_pages_deflated %llu\n", vb->pfn_pages_out, vb->range_pages_out);
	seq_printf(m, "pfn_buffers %llu\nrange_buffers %llu\nsplits %llu\noom_pages_returned %llu\n",
		   vb->pfn_buffers, vb->range_buffers, vb->splits, vb->oom_pages_returned);
	mutex_unlock(&vb->lock);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(vbg_orders);

/* -- probe and remove ---------------------------------------------------- */

static int vbg_find_vqs(struct vbg *vb)
{
	struct virtio_device *vdev = vb->vdev;
	const char *names[VBG_VQ_MAX] = {};
	vq_callback_t *callbacks[VBG_VQ_MAX] = {};
	int err;

	names[VBG_VQ_INFLATE] = "inflate";
	callbacks[VBG_VQ_INFLATE] = vbg_ack;
	names[VBG_VQ_DEFLATE] = "deflate";
	callbacks[VBG_VQ_DEFLATE] = vbg_ack;
	if (virtio_has_feature(vdev, VIRTIO_BALLOON_F_STATS_VQ)) {
		names[VBG_VQ_STATS] = "stats";
		callbacks[VBG_VQ_STATS] = vbg_stats_request;
	}
	if (virtio_has_feature(vdev, VIRTIO_BALLOON_F_REPORTING)) {
		names[VBG_VQ_REPORTING] = "reporting";
		callbacks[VBG_VQ_REPORTING] = vbg_ack;
	}
	if (vb->ranges) {
		names[VBG_VQ_RANGE_INFLATE] = "range-inflate";
		callbacks[VBG_VQ_RANGE_INFLATE] = vbg_ack;
		names[VBG_VQ_RANGE_DEFLATE] = "range-deflate";
		callbacks[VBG_VQ_RANGE_DEFLATE] = vbg_ack;
	}
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
	{
		struct virtqueue_info info[VBG_VQ_MAX] = {};
		unsigned int i;

		for (i = 0; i < VBG_VQ_MAX; i++)
			info[i] = (struct virtqueue_info){ .name = names[i], .callback = callbacks[i] };
		err = virtio_find_vqs(vdev, VBG_VQ_MAX, vb->vqs, info, NULL);
	}
#else
	err = virtio_find_vqs(vdev, VBG_VQ_MAX, vb->vqs, callbacks, names, NULL);
#endif
	if (err)
		dev_err(&vdev->dev, "cannot set up the queues its features call for (%s): %d; "
			"does the device have that many (QEMU num_vqs)?\n",
			vb->ranges ? "with the two range queues" : "without ranges", err);
	return err;
}

static int vbg_validate(struct virtio_device *vdev)
{
	/*
	 * Reported pages lose their contents on the host. A guest that poisons
	 * or zeroes free pages expects them intact, and this driver does not
	 * negotiate PAGE_POISON to tell the host so: no reporting then.
	 */
	if (!IS_ENABLED(CONFIG_PAGE_REPORTING) || want_init_on_free() || page_poisoning_enabled_static())
		__virtio_clear_bit(vdev, VIRTIO_BALLOON_F_REPORTING);
	/* Ranges and PFNs are guest-physical addresses, never bus addresses. */
	__virtio_clear_bit(vdev, VIRTIO_F_ACCESS_PLATFORM);
	return 0;
}

static int vbg_probe(struct virtio_device *vdev)
{
	unsigned int order, batch_len;
	struct vbg *vb;
	int err;

	if (!vdev->config->get) {
		dev_err(&vdev->dev, "config space access is disabled\n");
		return -EINVAL;
	}
	vb = kzalloc(sizeof(*vb), GFP_KERNEL);
	if (!vb)
		return -ENOMEM;
	vdev->priv = vb;
	vb->vdev = vdev;
	vb->ranges = virtio_has_feature(vdev, VBG_F_RANGES);
	vb->deflate_on_oom = virtio_has_feature(vdev, VIRTIO_BALLOON_F_DEFLATE_ON_OOM);
	INIT_WORK(&vb->size_work, vbg_size_work);
	INIT_WORK(&vb->stats_work, vbg_stats_work);
	spin_lock_init(&vb->stop_lock);
	init_waitqueue_head(&vb->acked);
	mutex_init(&vb->lock);
	for (order = 0; order < VBG_ORDERS; order++)
		INIT_LIST_HEAD(&vb->blocks[order]);

	err = vbg_find_vqs(vb);
	if (err)
		goto out_free;
	if (vb->ranges) {
		vb->range_cap = min3(virtqueue_get_vring_size(vb->vqs[VBG_VQ_RANGE_INFLATE]),
				     virtqueue_get_vring_size(vb->vqs[VBG_VQ_RANGE_DEFLATE]),
				     (unsigned int)VBG_RANGES_PER_BUF);
		vb->sgs = kmalloc_array(vb->range_cap, sizeof(*vb->sgs), GFP_KERNEL);
		if (!vb->sgs) {
			err = -ENOMEM;
			goto out_del_vqs;
		}
	}
	batch_len = max_t(unsigned int, VBG_PFNS_PER_BUF, vb->range_cap);
	vb->batch = kmalloc_array(batch_len, sizeof(*vb->batch), GFP_KERNEL);
	if (!vb->batch) {
		err = -ENOMEM;
		goto out_del_vqs;
	}
	if (vb->deflate_on_oom) {
		vb->oom_nb.notifier_call = vbg_oom_notify;
		/* virtio_balloon's priority: before the OOM killer picks a victim */
		vb->oom_nb.priority = 80;
		err = register_oom_notifier(&vb->oom_nb);
		if (err)
			goto out_del_vqs;
		vb->oom_registered = true;
	}

	virtio_device_ready(vdev);

	if (virtio_has_feature(vdev, VIRTIO_BALLOON_F_STATS_VQ))
		vbg_post_stats(vb);	/* the device holds it until it wants numbers */
	if (IS_ENABLED(CONFIG_PAGE_REPORTING) && virtio_has_feature(vdev, VIRTIO_BALLOON_F_REPORTING)) {
		if (virtqueue_get_vring_size(vb->vqs[VBG_VQ_REPORTING]) < PAGE_REPORTING_CAPACITY) {
			dev_warn(&vdev->dev, "reporting queue holds fewer than %d entries: no free page reporting\n",
				 PAGE_REPORTING_CAPACITY);
		} else {
			vb->pr_dev_info.report = vbg_report;
			err = page_reporting_register(&vb->pr_dev_info);
			if (err)
				dev_warn(&vdev->dev, "free page reporting not registered: %d\n", err);
			else
				vb->reporting_registered = true;
		}
	}
	vb->debugfs = debugfs_create_dir(KBUILD_MODNAME, NULL);
	debugfs_create_file("orders", 0444, vb->debugfs, vb, &vbg_orders_fops);

	dev_info(&vdev->dev, "vhostballoon_guest: ranges %s (max order %u, %u ranges per buffer)\n",
		 vb->ranges ? "on" : "off", vbg_top_order(vb), vb->range_cap);
	if (vbg_towards_target(vb))
		vbg_queue(vb, &vb->size_work);
	return 0;

out_del_vqs:
	vdev->config->del_vqs(vdev);
out_free:
	kfree(vb->batch);
	kfree(vb->sgs);
	kfree(vb);
	return err;
}

static void vbg_remove(struct virtio_device *vdev)
{
	struct vbg *vb = vdev->priv;
	unsigned int order;
	long done;

	if (vb->reporting_registered)
		page_reporting_unregister(&vb->pr_dev_info);
	if (vb->oom_registered)
		unregister_oom_notifier(&vb->oom_nb);
	spin_lock_irq(&vb->stop_lock);
	vb->stopping = true;
	spin_unlock_irq(&vb->stop_lock);
	cancel_work_sync(&vb->size_work);
	cancel_work_sync(&vb->stats_work);
	debugfs_remove_recursive(vb->debugfs);

	/* Every page goes back, the device told first; each pass frees at
	 * least one page or stops, so this ends. */
	do {
		done = vbg_deflate(vb, vb->num_pages);
	} while (done > 0);

	virtio_reset_device(vdev);
	/* Left over only when the device broke: it can touch nothing now. */
	for (order = 0; order < VBG_ORDERS; order++) {
		while (!list_empty(&vb->blocks[order])) {
			struct vbg_block b = vbg_take_block(vb, order);

			if (!vb->deflate_on_oom)
				adjust_managed_page_count(b.page, b.npages);
			vbg_free_block(&b);
		}
	}
	vdev->config->del_vqs(vdev);
	kfree(vb->batch);
	kfree(vb->sgs);
	kfree(vb);
}

static unsigned int vbg_features[] = {
	VIRTIO_BALLOON_F_MUST_TELL_HOST,
	VIRTIO_BALLOON_F_STATS_VQ,
	VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
	VIRTIO_BALLOON_F_REPORTING,
	VBG_F_RANGES,
};

static const struct virtio_device_id vbg_id_table[] = {
	{ VIRTIO_ID_BALLOON, VIRTIO_DEV_ANY_ID },
	{ 0 },
};

static struct virtio_driver vbg_driver = {
	.feature_table = vbg_features,
	.feature_table_size = ARRAY_SIZE(vbg_features),
	.driver.name = KBUILD_MODNAME,
	.driver.owner = THIS_MODULE,
	.id_table = vbg_id_table,
	.validate = vbg_validate,
	.probe = vbg_probe,
	.remove = vbg_remove,
	.config_changed = vbg_config_changed,
};

module_virtio_driver(vbg_driver);
MODULE_DEVICE_TABLE(virtio, vbg_id_table);
MODULE_DESCRIPTION("virtio balloon driver that inflates by address/length ranges, highest order first");
MODULE_LICENSE("GPL");
