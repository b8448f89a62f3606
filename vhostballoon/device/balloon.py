"""The balloon device: features, config space, target and page accounting.

It never sees a message or a socket. The server feeds it typed values (the
negotiated features, a config read or write, what a queue worker did) and
asks it what to do; popping PFNs and freeing host memory is the C core's job
(vhostballoon.native), which the server runs off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from ..native import (
    PAGE_SHIFT,
    PAGE_SIZE,
    RANGE_ORDERS,
    SERVICE_BUCKETS,
    ConfigMailbox,
    ConfigWrite,
    DescRange,
    DiscardStats,
    GuestMemory,
    WorkerCounters,
    at_target,
)
from .config import CONFIG_SIZE, check_access
from .features import DEFAULT_FEATURES, RingFeature, feature_names
from .queues import SPECS, BufferFormat, Direction, QueueRole, queue_roles
from .reporting import ReportCounters, ReportPlan, Skip, plan_report
from .stats import MAX_STATS_BYTES, GuestStats

log = structlog.get_logger("vhostballoon.device")

# Linux: virtio_balloon.c, VIRTIO_BALLOON_ARRAY_PFNS_MAX. A larger buffer is
# legal for the device; we only use the number in log lines and the model.
LINUX_PFNS_PER_BUFFER = 256


def pages_deflated_unasked(old_actual: int, new_actual: int, num_pages: int) -> int:
    """Pages a write of actual took out of the balloon below both what the
    guest had and what it was asked (a deflate on its own: deflate-on-OOM)."""
    return max(0, min(old_actual, num_pages) - new_actual)


def plain_actual_step(old_actual: int, new_actual: int, num_pages: int) -> bool:
    """A guest write of actual that changes nothing but actual: not at the
    target, and no deflate-on-OOM.  The session replays such writes by
    setting actual alone."""
    return not pages_deflated_unasked(old_actual, new_actual, num_pages) and not at_target(num_pages, new_actual)


class FeatureError(ValueError):
    """The driver acked features the device did not offer."""


@dataclass(frozen=True)
class GuestWrite:
    """What one guest write of the config did."""

    new_actual: int
    poison_val: int
    poison_changed: bool
    changes: list[ConfigWrite]  # the changes of actual it logged (with any still in the log before it)


class ConfigView:
    """The config's fields by name, read from and written to the mailbox
    (the one owner: nothing is kept here)."""

    def __init__(self, mailbox: ConfigMailbox) -> None:
        object.__setattr__(self, "_mailbox", mailbox)

    @property
    def num_pages(self) -> int:
        return self._mailbox.read().num_pages

    @num_pages.setter
    def num_pages(self, value: int) -> None:
        self._mailbox.set_num_pages(value)

    @property
    def actual(self) -> int:
        return self._mailbox.read().actual

    @actual.setter
    def actual(self, value: int) -> None:
        self._mailbox.set_actual(value)

    @property
    def poison_val(self) -> int:
        return self._mailbox.read().poison_val

    @poison_val.setter
    def poison_val(self, value: int) -> None:
        self._mailbox.set_poison(value)

    def pack(self) -> bytes:
        return self._mailbox.pack()


@dataclass
class Counters:
    inflate_buffers: int = 0
    deflate_buffers: int = 0
    pages_inflated: int = 0
    pages_deflated: int = 0
    # The range queues (protocol/range-balloon.md), also in the totals above.
    range_inflate_buffers: int = 0
    range_deflate_buffers: int = 0
    pages_inflated_by_range: int = 0
    pages_deflated_by_range: int = 0
    ranges_refused: int = 0
    ranges_by_order: list[int] = field(default_factory=lambda: [0] * RANGE_ORDERS)
    # Page-moving buffers by service time (C: pop to used ring), bucket i under 2**i us.
    service_us_buckets: list[int] = field(default_factory=lambda: [0] * SERVICE_BUCKETS)
    service_ns_sum: int = 0
    invalid_pfns: int = 0
    repeated_pfns: int = 0
    discard: DiscardStats = field(default_factory=DiscardStats)
    freed_measured: int = 0  # drop of the backing files' allocated bytes across our discards
    # Pages the guest took back while its balloon was at or below the target:
    # nobody asked for them (DEFLATE_ON_OOM: Linux deflates under memory pressure).
    pages_deflated_unasked: int = 0
    report: ReportCounters = field(default_factory=ReportCounters)


class BalloonDevice:
    """One balloon device as seen by one front-end connection."""

    def __init__(
        self,
        memory: GuestMemory,
        offered_features: int = DEFAULT_FEATURES,
        target_bytes: int | None = None,
    ) -> None:
        if not offered_features & RingFeature.VERSION_1:
            raise FeatureError("the balloon must offer VERSION_1: QEMU's vhost-user test device is modern-only")
        self.memory = memory
        self.offered_features = offered_features
        self.acked_features = 0
        self.mailbox = ConfigMailbox()  # the config's one owner (csrc/config.c)
        self.config = ConfigView(self.mailbox)
        self.target_bytes = target_bytes
        self.counters = Counters()
        self.stats = GuestStats()

    # -- features and queues -------------------------------------------------

    def negotiate(self, features: int) -> None:
        extra = features & ~self.offered_features
        if extra:
            raise FeatureError(
                f"driver acked feature bits {feature_names(extra)} (0x{extra:x}) that were not offered"
            )
        self.acked_features = features

    @property
    def roles(self) -> list[QueueRole]:
        return queue_roles(self.acked_features or self.offered_features)

    def role_of(self, index: int) -> QueueRole | None:
        roles = self.roles
        return roles[index] if 0 <= index < len(roles) else None

    @property
    def event_idx(self) -> bool:
        return bool(self.acked_features & RingFeature.EVENT_IDX)

    @property
    def indirect(self) -> bool:
        return bool(self.acked_features & RingFeature.INDIRECT_DESC)

    # -- target and config space ---------------------------------------------

    @property
    def ram_bytes(self) -> int:
        return self.memory.total_bytes

    def set_target(self, target_bytes: int | None) -> bool:
        """Set the guest's target memory size (QMP ``balloon`` semantics).
        Returns True when num_pages changed, i.e. the guest must be told."""
        self.target_bytes = target_bytes
        return self.refresh_num_pages()

    def refresh_num_pages(self) -> bool:
        """Recompute num_pages from the target and the guest RAM we know of
        (QEMU: num_pages = (ram_size - target) >> 12, target clamped to RAM)."""
        ram = self.ram_bytes
        if self.target_bytes is None or ram == 0:
            num_pages = 0
        else:
            num_pages = (ram - min(self.target_bytes, ram)) >> PAGE_SHIFT
        changed = num_pages != self.mailbox.read().num_pages
        self.mailbox.set_num_pages(num_pages)
        return changed

    def read_config(self, offset: int, size: int) -> bytes:
        check_access(offset, size)
        return self.mailbox.pack()[offset : offset + size]

    def at_target(self) -> bool:
        """The guest says its balloon is at the target (native.at_target)."""
        values = self.mailbox.read()
        return at_target(values.num_pages, values.actual)

    def write_config(self, offset: int, data: bytes) -> GuestWrite:
        """A driver write through the protocol connection: the mailbox applies
        the rule (only ``actual`` and ``poison_val`` are taken: QEMU forwards
        the whole struct and its num_pages may be stale) and logs the change
        of actual, which is taken and counted here."""
        check_access(offset, len(data))
        bits = self.mailbox.guest_write(offset, data)
        values = self.mailbox.read()
        return GuestWrite(values.actual, values.poison_val, bool(bits & ConfigMailbox.POISON_CHANGED),
                          self.take_config_writes())

    @staticmethod
    def pages_deflated_unasked_by(write: ConfigWrite) -> int:
        return pages_deflated_unasked(write.old_actual, write.new_actual, write.num_pages)

    def take_config_writes(self) -> list[ConfigWrite]:
        """The guest's logged changes of actual, oldest first, counted
        (deflate-on-OOM: pages taken back below both what the guest had and
        what it was asked)."""
        writes = self.mailbox.take_writes()
        for w in writes:
            self.counters.pages_deflated_unasked += self.pages_deflated_unasked_by(w)
        return writes

    @property
    def poisoning(self) -> bool:
        """The guest poisons free pages (config poison_val != 0): a reported
        page must keep its content.  Honoured whether or not PAGE_POISON was
        negotiated yet: Linux writes poison_val during probe, before the
        front-end sends SET_FEATURES."""
        return self.config.poison_val != 0

    @property
    def actual_bytes(self) -> int | None:
        """Guest memory size as QMP query-balloon's ``actual`` reports it."""
        ram = self.ram_bytes
        if ram == 0:
            return None
        return max(0, ram - (self.mailbox.read().actual << PAGE_SHIFT))

    # -- inflate / deflate ---------------------------------------------------

    def record_queue_work(self, role: QueueRole, work: WorkerCounters) -> None:
        """Count what a queue thread did (the C core's totals since the last
        call) and say what the guest got wrong: invalid PFNs are ignored and
        never freed; repeated ones change nothing; a refused range (malformed,
        or an inflate of pages already ballooned) changes nothing."""
        spec = SPECS[role]
        if spec.journal_kind is None:
            raise ValueError(f"{role.value} queue moves no pages")
        inflate = spec.direction is Direction.INFLATE
        by_range = spec.format is BufferFormat.EXTENTS
        c = self.counters
        if inflate:
            c.pages_inflated += work.changed
        else:
            c.pages_deflated += work.changed
        if by_range:
            if inflate:
                c.range_inflate_buffers += work.buffers
                c.pages_inflated_by_range += work.changed
                for order, count in enumerate(work.range_orders):
                    c.ranges_by_order[order] += count
            else:
                c.range_deflate_buffers += work.buffers
                c.pages_deflated_by_range += work.changed
            c.ranges_refused += work.refused
        elif inflate:
            c.inflate_buffers += work.buffers
        else:
            c.deflate_buffers += work.buffers
        for bucket, count in enumerate(work.service_us_buckets):
            c.service_us_buckets[bucket] += count
        c.service_ns_sum += work.service_ns_sum
        c.invalid_pfns += work.invalid
        c.repeated_pfns += work.unchanged
        c.discard.add(work.discard)
        c.freed_measured += work.freed_measured
        if work.refused:
            gpa, length = work.last_refused
            log.warning(
                "ranges refused: never freed, the buffer goes back",
                queue=role.value, count=work.refused, reason=work.last_refused_why,
                addr=hex(gpa), len=length, guest_ram=hex(self.ram_bytes),
            )
        if work.invalid:
            log.warning(
                "pfns outside guest memory ignored",
                queue=role.value,
                count=work.invalid,
                first_pfn=hex(work.last_invalid_pfn),
                guest_ram=hex(self.ram_bytes),
            )
        if work.unchanged:
            log.info(
                "pfns already in that state" if inflate else "pfns deflated that were not ballooned",
                queue=role.value,
                count=work.unchanged,
                first_pfn=hex(work.last_unchanged_pfn),
            )

    # -- free page reporting ---------------------------------------------------

    def plan_report(self, descs: list[DescRange], *, whole_huge_pages_only: bool) -> ReportPlan:
        """Check one reporting buffer's entries (reporting.plan_report) and
        count them.  Call under the memory lock."""
        plan = plan_report(descs, self.memory, poison=self.poisoning, whole_huge_pages_only=whole_huge_pages_only)
        self.counters.report.add_plan(plan)
        return plan

    def record_report_discard(self, stats: DiscardStats, freed_measured: int) -> None:
        report = self.counters.report
        report.freed_bytes += stats.bytes_freed
        report.freed_measured += freed_measured
        if stats.bytes_failed or stats.pages_outside:
            report.add_skipped(Skip.DISCARD_FAILED, stats.bytes_failed + stats.pages_outside * PAGE_SIZE)

    # -- statistics ------------------------------------------------------------

    def record_stats(self, descs: list[DescRange]) -> int:
        """Decode one stats buffer (device-readable descriptors, read as one
        byte string as the spec's scatterlist semantics say).  Returns the
        number of bytes that could not be used; a descriptor outside guest
        memory makes the whole buffer unusable.  Call under the memory lock."""
        chunks = []
        total = 0
        for d in descs:
            length = min(d.length, MAX_STATS_BYTES - total)
            if length <= 0:
                break
            chunk = self.memory.read(d.addr, length)
            if chunk is None:
                self.stats.bad_buffers += 1
                log.warning("stats buffer outside guest memory: ignored", addr=hex(d.addr), len=d.length)
                return sum(x.length for x in descs)
            chunks.append(chunk)
            total += length
        trailing = self.stats.record(b"".join(chunks))
        if trailing:
            log.warning("stats buffer is not a whole number of 10-byte entries", trailing_bytes=trailing)
        return trailing

    def record_discard(self, stats: DiscardStats, freed_measured: int) -> None:
        self.counters.discard.add(stats)
        self.counters.freed_measured += freed_measured

    @property
    def ballooned_bytes(self) -> int:
        return self.memory.ballooned_pages * PAGE_SIZE

    def describe(self) -> dict:
        """Figures for query-balloon (names in QMP's dash style)."""
        c = self.counters
        config = self.mailbox.read()
        # Pages given by range and not taken back (by range or by PFN: the
        # bitmap does not say which queue a page came by, so a range page
        # deflated by PFN is counted against the PFN side).
        by_range = min(self.memory.ballooned_pages, max(0, c.pages_inflated_by_range - c.pages_deflated_by_range))
        return {
            "num-pages": config.num_pages,
            "actual-pages": config.actual,
            "ballooned-bytes": self.ballooned_bytes,
            "guest-ram-bytes": self.ram_bytes,
            "features": feature_names(self.acked_features),
            "queues": [r.value for r in self.roles],
            "inflate-buffers": c.inflate_buffers,
            "deflate-buffers": c.deflate_buffers,
            "pages-inflated": c.pages_inflated,
            "pages-deflated": c.pages_deflated,
            "range-inflate-buffers": c.range_inflate_buffers,
            "range-deflate-buffers": c.range_deflate_buffers,
            "pages-inflated-by-range": c.pages_inflated_by_range,
            "pages-deflated-by-range": c.pages_deflated_by_range,
            "pages-ballooned-by-range": by_range,
            "pages-ballooned-by-pfn": max(0, self.memory.ballooned_pages - by_range),
            "ranges-by-order": {str(order): n for order, n in enumerate(c.ranges_by_order) if n},
            "ranges-refused": c.ranges_refused,
            # Buffer service times, pop to used ring: counts[i] of buffers under
            # le-us[i] microseconds (and above the previous bound); the last, above all.
            "buffer-service-time": {
                "le-us": [1 << i for i in range(SERVICE_BUCKETS - 1)],
                "counts": list(c.service_us_buckets),
                "sum-us": c.service_ns_sum // 1000,
            },
            "invalid-pfns": c.invalid_pfns,
            "repeated-pfns": c.repeated_pfns,
            "discarded-bytes": c.discard.bytes_freed,
            "discard-failed-bytes": c.discard.bytes_failed,
            "discard-syscalls": c.discard.syscalls,
            "freed-bytes-measured": c.freed_measured,
            "pages-deflated-unasked": c.pages_deflated_unasked,
            "poison-val": config.poison_val,
            **c.report.describe(),
        }


__all__ = [
    "BalloonDevice",
    "GuestWrite",
    "FeatureError",
    "CONFIG_SIZE",
]
