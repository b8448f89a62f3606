"""Freeing: discards off the event loop, and when pending pages go.

Pending pages are ballooned pages of partly ballooned huge pages (and of
plain shmem's partial 2 MiB blocks) that were not freed yet.  The C inflate
thread frees them itself at the policy's byte threshold, at the target
(plain shmem) and when its queue goes quiet; the scheduler here keeps the
slow decisions: the policy's deadline (``flush-after``), "guest at target",
a policy change, a restore.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import structlog
import trio

from ..device.balloon import BalloonDevice
from ..device.hugepages import FlushPolicy, HugePageTracker
from ..native import DiscardStats, GuestMemory, RangeList
from .memory_lock import MemoryLock
from .persist import SessionPersistence
from .rings import Rings

log = structlog.get_logger("vhostballoon.session")


class Discarder:
    """Frees ranges in a worker thread (cffi releases the GIL); the caller
    holds the memory lock."""

    def __init__(self, memory: GuestMemory, huge: HugePageTracker, device: BalloonDevice) -> None:
        self.memory = memory
        self.huge = huge
        self.device = device
        self._failed_regions_reported: set[int] = set()

    async def __call__(self, ranges: RangeList) -> tuple[DiscardStats, int]:
        """Returns (DiscardStats, bytes the backing files shrank by)."""
        stats, measured = await trio.to_thread.run_sync(self._blocking, ranges)
        self.device.record_discard(stats, measured)
        if stats.bytes_failed:
            self.report_failure(stats)
        return stats, measured

    def _blocking(self, ranges: RangeList) -> tuple[DiscardStats, int]:
        before = self.memory.allocated_bytes()
        stats = self.huge.discard(ranges)
        after = self.memory.allocated_bytes()
        return stats, max(0, before - after)

    def report_failure(self, stats: DiscardStats) -> None:
        region = stats.failed_region
        if region in self._failed_regions_reported:  # say it once per region
            return
        self._failed_regions_reported.add(region)
        log.error(
            "host memory of this region cannot be freed (fallocate and madvise both refused): "
            "pages stay ballooned in the guest but the host keeps them",
            region=region,
            errno=stats.last_errno,
            error=os.strerror(stats.last_errno) if stats.last_errno else None,
        )


class FlushScheduler:
    def __init__(
        self,
        *,
        memory_lock: MemoryLock,
        huge: HugePageTracker,
        device: BalloonDevice,
        persist: SessionPersistence,
        rings: Rings,
        discard: Discarder,
        guest_at_target: Callable[[], bool],
        before_look: Callable[[], None],
    ) -> None:
        self.memory_lock = memory_lock
        self.huge = huge
        self.device = device
        self.persist = persist
        self.rings = rings
        self.discard = discard
        self.guest_at_target = guest_at_target
        self.before_look = before_look  # brings the guest's latest config writes in
        self.nursery: trio.Nursery | None = None
        self._timer_armed = False

    def soon(self, reason: str) -> None:
        if self.nursery is not None:
            self.nursery.start_soon(self.flush, reason)

    async def flush(self, reason: str) -> None:
        """Free the pending pages of partly ballooned huge pages if the policy
        says so now (after a deadline, at the target, on a policy change)."""
        self.before_look()
        async with self.memory_lock:
            if self.huge.flush_due(guest_at_target=self.guest_at_target()):
                ranges = self.huge.collect()
                if len(ranges):
                    splits_before = self.device.counters.discard.splits
                    await self.discard(ranges)
                    self.persist.record_collect()
                    log.info(
                        "pending partial huge pages freed",
                        reason=reason,
                        bytes=ranges.total_bytes,
                        ranges=len(ranges),
                        thp_splits=self.device.counters.discard.splits - splits_before,
                        policy=self.huge.policy.mode.value,
                    )
            # Plain shmem's partial 2 MiB blocks: no huge page to keep whole,
            # so they go under every policy.
            batch = self.huge.collect_batch()
            if len(batch):
                await self.discard(batch)
                self.persist.record_collect_batch()
        self.arm_timer()

    def arm_timer(self) -> None:
        if self._timer_armed or self.nursery is None:
            return
        # The inflate thread tells once when pending pages appear; ask again
        # before looking, so pages that appear after the look are told.
        for worker in self.rings.inflate_workers():
            worker.notice_pending()
        delay = self.huge.flush_delay()
        if delay is None:
            return
        self._timer_armed = True
        self.nursery.start_soon(self._timed, delay)

    async def _timed(self, delay: float) -> None:
        await trio.sleep(delay)
        self._timer_armed = False
        await self.flush("deadline")

    def set_policy(self, policy: FlushPolicy) -> None:
        self.huge.policy = policy
        self.rings.set_flush_policy(policy)
        self.soon("policy change")
