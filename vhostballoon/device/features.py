"""virtio-balloon feature bits and queue roles.

Sources: virtio 1.2 spec, 5.5.3 "Feature bits" and 6 "Reserved Feature Bits";
Linux include/uapi/linux/virtio_balloon.h, drivers/virtio/virtio_balloon.c
(init_vqs) for the packed queue indices.
"""

from __future__ import annotations

import enum


class BalloonFeature(enum.IntFlag):
    MUST_TELL_HOST = 1 << 0  # tell the host before using a deflated page
    STATS_VQ = 1 << 1  # statistics virtqueue present
    DEFLATE_ON_OOM = 1 << 2  # guest deflates by itself under memory pressure
    FREE_PAGE_HINT = 1 << 3  # free page hinting virtqueue (migration aid)
    PAGE_POISON = 1 << 4  # guest poisons free pages; config poison_val valid
    REPORTING = 1 << 5  # free page reporting virtqueue


class RingFeature(enum.IntFlag):
    INDIRECT_DESC = 1 << 28  # virtio 1.2, 6: VIRTIO_F_INDIRECT_DESC
    EVENT_IDX = 1 << 29  # virtio 1.2, 6: VIRTIO_F_EVENT_IDX
    VERSION_1 = 1 << 32  # virtio 1.2, 6: VIRTIO_F_VERSION_1 (QEMU's test device is modern-only)


_FEATURE_NAMES = {
    **{int(f): f"balloon:{f.name.lower()}" for f in BalloonFeature},
    **{int(f): f"ring:{f.name.lower()}" for f in RingFeature},
}

# What this back-end offers by default (issue 2 scope: inflate/deflate only).
DEFAULT_FEATURES = int(
    BalloonFeature.MUST_TELL_HOST
    | RingFeature.INDIRECT_DESC
    | RingFeature.EVENT_IDX
    | RingFeature.VERSION_1
)


class QueueRole(enum.Enum):
    INFLATE = "inflate"
    DEFLATE = "deflate"
    STATS = "stats"
    FREE_PAGE_HINT = "free-page-hint"
    REPORTING = "reporting"


# The most queues a balloon can have; QEMU's num_vqs may not exceed it.
MAX_QUEUES = len(QueueRole)


def queue_roles(features: int) -> list[QueueRole]:
    """Queue index -> role. Linux packs the indices: a queue exists only when
    its feature is negotiated, and later queues move down (init_vqs)."""
    roles = [QueueRole.INFLATE, QueueRole.DEFLATE]
    if features & BalloonFeature.STATS_VQ:
        roles.append(QueueRole.STATS)
    if features & BalloonFeature.FREE_PAGE_HINT:
        roles.append(QueueRole.FREE_PAGE_HINT)
    if features & BalloonFeature.REPORTING:
        roles.append(QueueRole.REPORTING)
    return roles


def feature_names(features: int) -> list[str]:
    """Names of the set bits, unknown bits as ``bit:N``."""
    names = []
    for bit in range(64):
        if features & (1 << bit):
            names.append(_FEATURE_NAMES.get(1 << bit, f"bit:{bit}"))
    return names
