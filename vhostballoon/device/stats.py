"""Guest memory statistics (VIRTIO_BALLOON_F_STATS_VQ; virtio 1.2, 5.5.6.3).

The guest keeps one device-readable buffer in the stats queue: an array of
packed ``struct virtio_balloon_stat { le16 tag; le64 val; }`` (10 bytes
each).  The device holds it until it wants fresh numbers, then returns it;
the guest refills it and adds it again.  This module decodes the array and
keeps the latest values; when to ask is the server's business.

Tags: include/uapi/linux/virtio_balloon.h.  0..9 are in the virtio spec and
every Linux since 5.x (a 6.1 guest sends these ten); 10..15 came with Linux
6.12.  Names follow QEMU's ``guest-stats`` QOM property
(hw/virtio/virtio-balloon.c ``balloon_stat_names``) so QMP users find the
same keys; tags nobody has named yet are kept by number as ``stat-tag-N``.
Values are as the guest sends them: bytes for memory, swap and the
scan/reclaim amounts (Linux converts pages with pages_to_bytes), counts for
faults, hugetlb allocations, OOM kills and allocation stalls.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

STAT = struct.Struct("<HQ")  # packed: no padding between or after the fields
STAT_SIZE = STAT.size  # 10

# Bound on what is read from one (guest-controlled) buffer: 409 entries,
# far more than the 16 tags Linux knows.
MAX_STATS_BYTES = 4096

STAT_NAMES: dict[int, str] = {
    0: "stat-swap-in",  # VIRTIO_BALLOON_S_SWAP_IN, bytes
    1: "stat-swap-out",  # VIRTIO_BALLOON_S_SWAP_OUT, bytes
    2: "stat-major-faults",  # VIRTIO_BALLOON_S_MAJFLT
    3: "stat-minor-faults",  # VIRTIO_BALLOON_S_MINFLT
    4: "stat-free-memory",  # VIRTIO_BALLOON_S_MEMFREE, bytes
    5: "stat-total-memory",  # VIRTIO_BALLOON_S_MEMTOT, bytes
    6: "stat-available-memory",  # VIRTIO_BALLOON_S_AVAIL, bytes
    7: "stat-disk-caches",  # VIRTIO_BALLOON_S_CACHES, bytes
    8: "stat-htlb-pgalloc",  # VIRTIO_BALLOON_S_HTLB_PGALLOC
    9: "stat-htlb-pgfail",  # VIRTIO_BALLOON_S_HTLB_PGFAIL
    10: "stat-oom-kills",  # VIRTIO_BALLOON_S_OOM_KILL (Linux 6.12)
    11: "stat-alloc-stalls",  # VIRTIO_BALLOON_S_ALLOC_STALL
    12: "stat-async-scans",  # VIRTIO_BALLOON_S_ASYNC_SCAN, bytes
    13: "stat-direct-scans",  # VIRTIO_BALLOON_S_DIRECT_SCAN, bytes
    14: "stat-async-reclaims",  # VIRTIO_BALLOON_S_ASYNC_RECLAIM, bytes
    15: "stat-direct-reclaims",  # VIRTIO_BALLOON_S_DIRECT_RECLAIM, bytes
}

# Why 5 s by default (QEMU's own balloon polls only when told to, via the
# guest-stats-polling-interval property): here the back-end is where users
# look, and a refresh costs the guest one work item (si_meminfo and the vm
# event counters: microseconds) and two notifications, so every 5 s is
# negligible for the guest while query-balloon is never more than 5 s stale.
DEFAULT_STATS_INTERVAL = 5.0


def stat_name(tag: int) -> str:
    return STAT_NAMES.get(tag, f"stat-tag-{tag}")


def decode_stats(data: bytes) -> tuple[dict[int, int], int]:
    """Tag -> value of every whole entry in data (a later duplicate wins),
    and the number of trailing bytes that are not a whole entry."""
    values: dict[int, int] = {}
    whole = len(data) - len(data) % STAT_SIZE
    for tag, value in STAT.iter_unpack(data[:whole]):
        values[tag] = value
    return values, len(data) - whole


@dataclass
class GuestStats:
    """The latest statistics one guest sent, and when."""

    values: dict[int, int] = field(default_factory=dict)
    updates: int = 0  # buffers decoded
    updated_wall: float | None = None  # time.time() of the last one
    updated_monotonic: float | None = None
    bad_buffers: int = 0  # buffers that were outside guest memory or not whole entries

    def record(self, data: bytes, now: float | None = None) -> int:
        """Take a buffer's bytes; returns how many trailing bytes were ignored."""
        values, trailing = decode_stats(data)
        self.values = values
        self.updates += 1
        self.updated_wall = time.time()
        self.updated_monotonic = time.monotonic() if now is None else now
        if trailing:
            self.bad_buffers += 1
        return trailing

    def age(self, now: float | None = None) -> float | None:
        if self.updated_monotonic is None:
            return None
        return max(0.0, (time.monotonic() if now is None else now) - self.updated_monotonic)

    def describe(self, interval: float) -> dict:
        """For query-stats and query-balloon's ``guest-stats``."""
        age = self.age()
        return {
            "stats": {stat_name(tag): value for tag, value in sorted(self.values.items())},
            "last-update": int(self.updated_wall) if self.updated_wall is not None else None,
            "age-seconds": round(age, 3) if age is not None else None,
            "stats-interval": interval,
            "updates": self.updates,
            "bad-buffers": self.bad_buffers,
        }


__all__ = [
    "DEFAULT_STATS_INTERVAL",
    "GuestStats",
    "MAX_STATS_BYTES",
    "STAT_NAMES",
    "STAT_SIZE",
    "decode_stats",
    "stat_name",
]
