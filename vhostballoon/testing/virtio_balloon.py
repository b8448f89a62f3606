"""The virtio-balloon device as a guest driver sees it: feature bits, the
packed queue table, the config layout, the statistics tags.

Written from the virtio 1.2 specification, 5.5 "Traditional Memory Balloon
Device" (cited as "virtio 5.5.x"), and Linux ``include/uapi/linux/
virtio_balloon.h`` and ``drivers/virtio/virtio_balloon.c``; never from the
back-end's own tables, so that the model guest checks the back-end instead of
agreeing with it.
"""

from __future__ import annotations

import enum

# -- feature bits, as masks (1 << bit) -------------------------------------------

VIRTIO_BALLOON_F_MUST_TELL_HOST = 1 << 0  # virtio 5.5.3: tell the host before using deflated pages
VIRTIO_BALLOON_F_STATS_VQ = 1 << 1  # virtio 5.5.3: a statistics virtqueue is present
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 1 << 2  # virtio 5.5.3: deflate when the guest runs out of memory
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 1 << 3  # virtio 5.5.3: free page hinting virtqueue
VIRTIO_BALLOON_F_PAGE_POISON = 1 << 4  # virtio 5.5.3: guest poisons free pages; poison_val valid
VIRTIO_BALLOON_F_REPORTING = 1 << 5  # virtio 5.5.3 (F_PAGE_REPORTING): free page reporting virtqueue
# protocol/range-balloon.md (this project's extension): range-inflate and range-deflate queues.
VIRTIO_BALLOON_F_RANGES = 1 << 60
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28  # virtio 6 "Reserved Feature Bits": VIRTIO_F_INDIRECT_DESC
VIRTIO_RING_F_EVENT_IDX = 1 << 29  # virtio 6: VIRTIO_F_EVENT_IDX
VIRTIO_F_VERSION_1 = 1 << 32  # virtio 6: VIRTIO_F_VERSION_1 (QEMU's vhost-user test device is modern-only)


# -- queues ----------------------------------------------------------------------


class QueueRole(enum.Enum):
    """virtio 5.5.2 "Virtqueues"; the values are the queue names Linux gives
    (init_vqs), but for free-page-hint ("free_page_vq") and reporting ("reporting_vq")."""

    INFLATE = "inflate"
    DEFLATE = "deflate"
    STATS = "stats"
    FREE_PAGE_HINT = "free-page-hint"
    REPORTING = "reporting"
    RANGE_INFLATE = "range-inflate"  # protocol/range-balloon.md
    RANGE_DEFLATE = "range-deflate"


# virtio 5.5.2 lists the queues in this order, each optional one "only if"
# its feature is negotiated.
_OPTIONAL_QUEUES = (
    (VIRTIO_BALLOON_F_STATS_VQ, QueueRole.STATS),
    (VIRTIO_BALLOON_F_FREE_PAGE_HINT, QueueRole.FREE_PAGE_HINT),
    (VIRTIO_BALLOON_F_REPORTING, QueueRole.REPORTING),
    # protocol/range-balloon.md "Virtqueues": after the spec's, packed the same way.
    (VIRTIO_BALLOON_F_RANGES, QueueRole.RANGE_INFLATE),
    (VIRTIO_BALLOON_F_RANGES, QueueRole.RANGE_DEFLATE),
)


def queue_roles(features: int) -> list[QueueRole]:
    """Queue index -> role, as Linux sets them up.

    ``init_vqs`` (drivers/virtio/virtio_balloon.c) names inflate and deflate
    always, stats, free_page_vq and reporting_vq only for their negotiated
    features, and ``vp_find_vqs`` (virtio_pci_common.c) gives a device queue
    index only to a named queue: the indices are packed, so with STATS_VQ and
    REPORTING but no FREE_PAGE_HINT reporting is queue 3, not 4."""
    roles = [QueueRole.INFLATE, QueueRole.DEFLATE]
    roles.extend(role for feature, role in _OPTIONAL_QUEUES if features & feature)
    return roles


# -- buffers -----------------------------------------------------------------------

VIRTIO_BALLOON_ARRAY_PFNS_MAX = 256  # virtio_balloon.c: PFNs per inflate/deflate buffer
PAGE_REPORTING_CAPACITY = 32  # mm/page_reporting.h: ranges per reporting buffer
RANGE_BLOCK_PAGES = 512  # protocol/range-balloon.md: the range driver's highest order, 2 MiB (order 9)
VIRTIO_BALLOON_OOM_NR_PAGES = 256  # virtio_balloon.c: pages leaked per OOM notification

# -- config space (virtio 5.5.4: struct virtio_balloon_config, all le32) -------------

CONFIG_SIZE = 16
CONFIG_NUM_PAGES = 0  # the device's target, in 4 KiB pages (read-only for the driver)
CONFIG_ACTUAL = 4  # pages in the balloon, written by the driver
# offset 8: free_page_hint_cmd_id (FREE_PAGE_HINT; not modelled)
CONFIG_POISON_VAL = 12  # with PAGE_POISON, written by the driver

# -- statistics (virtio 5.5.6.3; virtio_balloon.h): the tags a 6.1 kernel sends --------

VIRTIO_BALLOON_S_SWAP_IN = 0
VIRTIO_BALLOON_S_SWAP_OUT = 1
VIRTIO_BALLOON_S_MAJFLT = 2
VIRTIO_BALLOON_S_MINFLT = 3
VIRTIO_BALLOON_S_MEMFREE = 4
VIRTIO_BALLOON_S_MEMTOT = 5
VIRTIO_BALLOON_S_AVAIL = 6
VIRTIO_BALLOON_S_CACHES = 7
VIRTIO_BALLOON_S_HTLB_PGALLOC = 8
VIRTIO_BALLOON_S_HTLB_PGFAIL = 9
