"""Free page reporting (VIRTIO_BALLOON_F_REPORTING; virtio 1.2, 5.5.6.5):
which reported ranges to free, which to keep, which to refuse.

A reporting buffer is a device-writable scatterlist whose descriptors ARE
the free ranges: addr = guest physical address of a free block, len = its
size.  Linux (mm/page_reporting.c, drivers/virtio/virtio_balloon.c) sends
at most 32 of them per buffer (PAGE_REPORTING_CAPACITY), each a whole buddy
block of order >= page_reporting_order (pageblock_order by default: 2 MiB
on x86), so each is a power of two of at least 2 MiB, naturally aligned.
The guest blocks until the buffer comes back, and does not touch the pages
meanwhile (they are isolated from its free lists), so freeing them before
the buffer is returned is safe.

Validation, per entry (the buffer always comes back, used length 0):

- refused (counted as invalid, never freed): zero length; address or
  length not 4 KiB aligned; not wholly inside one region of guest memory;
  overlapping another entry of the same buffer (every entry involved: the
  guest says two different things about those pages); overlapping a page
  that is in the balloon.
- kept (valid, counted as skipped): every entry while the guest poisons free
  pages (config ``poison_val`` != 0: a freed page reads back as zeros and
  would fail the guest's poison check); on hugetlbfs, the part that is not
  whole huge pages (a punch there zeroes and frees nothing); under the
  ``whole`` huge page policy, the part of a THP-backed region that is not
  whole huge pages (freeing it would split the THP).
- freed: the rest, through the same batched discard engine as ballooned
  pages.  A 4 KiB-aligned entry that is not a naturally aligned power of
  two is legal (a guest may lower page_reporting_order) and freed; it is
  only logged.

Why "in the balloon" is refused, and why it never happens with a correct
guest: a reported block is free in the guest's buddy allocator, a ballooned
page is allocated to the balloon driver; a page is never both.  The order
of events keeps our view consistent too: Linux waits for each inflate or
deflate buffer to come back before it uses or frees those pages, and for
each report before the reported pages can be allocated again, and we
process every buffer under the memory lock.  So when a report arrives, no
page of it is ballooned here, pending (partly ballooned huge page) pages
included.  A report that says otherwise is hostile or broken; freeing it
anyway would cost nothing the host cares about (a ballooned page is the
host's), but it would put the huge page tracker's figures at odds with the
file, so it is refused and counted.  Deflate stays sacred: a deflated page
is no longer ballooned and is freed only if the guest reports it free
later, which is its own statement about its own page.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..native import PAGE_SIZE, DescRange, GuestMemory, RegionInfo

# Linux mm/page_reporting.h: ranges per reporting buffer.
PAGE_REPORTING_CAPACITY = 32


class Invalid(str, enum.Enum):
    ZERO_LENGTH = "zero-length"
    MISALIGNED = "misaligned"  # address or length not 4 KiB aligned
    OUTSIDE = "outside-memory"  # not wholly inside one region
    OVERLAPPING = "overlapping"  # with another entry of the same buffer
    IN_BALLOON = "in-balloon"  # covers a ballooned page


class Skip(str, enum.Enum):
    POISON = "poison"  # the guest poisons free pages: never discard them
    HUGETLBFS_PARTIAL = "hugetlbfs-partial"  # not whole hugetlbfs pages: a punch frees nothing
    WOULD_SPLIT = "would-split-thp"  # policy 'whole': not whole THPs
    DISCARD_FAILED = "discard-failed"  # the region refuses fallocate and madvise


@dataclass(frozen=True)
class ReportPlan:
    """What to do with one reporting buffer."""

    entries: int
    reported_bytes: int  # sum of every entry's length, invalid ones included
    free: list[tuple[int, int]]  # (gpa, length) to discard now
    skipped: dict[Skip, int]  # bytes of valid entries kept, by reason
    invalid: list[tuple[DescRange, Invalid]]
    unnatural: list[DescRange]  # valid, freed, but not a naturally aligned power of two

    @property
    def free_bytes(self) -> int:
        return sum(length for _, length in self.free)

    @property
    def invalid_bytes(self) -> int:
        return sum(d.length for d, _ in self.invalid)


def _is_natural(d: DescRange) -> bool:
    return d.length & (d.length - 1) == 0 and d.addr % d.length == 0


def _overlapping(candidates: Sequence[tuple[int, DescRange]]) -> set[int]:
    """Indices of candidates that overlap another candidate (sort and sweep:
    an entry that starts before the furthest end seen so far overlaps the
    entry that reached it, and both are marked)."""
    marked: set[int] = set()
    reach_end, reach_index = -1, -1
    for index, d in sorted(candidates, key=lambda item: item[1].addr):
        if d.addr < reach_end:
            marked.add(index)
            marked.add(reach_index)
        if d.addr + d.length > reach_end:
            reach_end, reach_index = d.addr + d.length, index
    return marked


def _whole_huge_pages(region: RegionInfo, gpa: int, length: int, granule: int) -> tuple[int, int]:
    """The whole huge pages (by file offset) inside [gpa, gpa+length), as
    (gpa, length); length 0 if there is none."""
    delta = region.mmap_offset - region.gpa  # file offset = gpa + delta
    first = -(-(gpa + delta) // granule) * granule - delta
    end = ((gpa + length + delta) // granule) * granule - delta
    return (first, end - first) if end > first else (gpa, 0)


def plan_report(
    descs: Sequence[DescRange],
    memory: GuestMemory,
    *,
    poison: bool,
    whole_huge_pages_only: bool,
) -> ReportPlan:
    """Decide, entry by entry, what one reporting buffer frees (see the
    module docstring for the rules).  Reads the memory table and the
    ballooned bitmap: call it under the memory lock."""
    invalid: list[tuple[DescRange, Invalid]] = []
    candidates: list[tuple[int, DescRange]] = []
    region_of: dict[int, int] = {}
    for index, d in enumerate(descs):
        if d.length == 0:
            invalid.append((d, Invalid.ZERO_LENGTH))
        elif (d.addr | d.length) % PAGE_SIZE:
            invalid.append((d, Invalid.MISALIGNED))
        else:
            region = memory.region_of(d.addr, d.length)
            if region is None:
                invalid.append((d, Invalid.OUTSIDE))
            else:
                region_of[index] = region
                candidates.append((index, d))
    overlapping = _overlapping(candidates)
    regions = memory.regions if candidates else []
    free: list[tuple[int, int]] = []
    skipped: dict[Skip, int] = {}
    unnatural: list[DescRange] = []
    for index, d in candidates:
        if index in overlapping:
            invalid.append((d, Invalid.OVERLAPPING))
            continue
        if memory.ballooned_in_range(d.addr, d.length):
            invalid.append((d, Invalid.IN_BALLOON))
            continue
        if poison:
            skipped[Skip.POISON] = skipped.get(Skip.POISON, 0) + d.length
            continue
        if not _is_natural(d):
            unnatural.append(d)
        region = regions[region_of[index]]
        gpa, length = d.addr, d.length
        reason = None
        if region.backing == "hugetlbfs":
            granule = region.huge_page_size if region.huge_page_size > PAGE_SIZE else region.fs_block
            if granule > PAGE_SIZE:
                gpa, length = _whole_huge_pages(region, gpa, length, granule)
                reason = Skip.HUGETLBFS_PARTIAL
        elif whole_huge_pages_only and region.thp and region.huge_page_size > PAGE_SIZE:
            gpa, length = _whole_huge_pages(region, gpa, length, region.huge_page_size)
            reason = Skip.WOULD_SPLIT
        if length:
            free.append((gpa, length))
        if length != d.length:
            skipped[reason] = skipped.get(reason, 0) + d.length - length
    return ReportPlan(
        entries=len(descs),
        reported_bytes=sum(d.length for d in descs),
        free=free,
        skipped=skipped,
        invalid=invalid,
        unnatural=unnatural,
    )


@dataclass
class ReportCounters:
    """Free page reporting figures of one connection (query-balloon)."""

    buffers: int = 0
    entries: int = 0
    reported_bytes: int = 0  # every entry, invalid ones included
    freed_bytes: int = 0  # accepted by the kernel (fallocate / madvise)
    freed_measured: int = 0  # drop of the backing files' allocated bytes across those discards
    skipped_bytes: int = 0  # valid but kept
    invalid_entries: int = 0
    invalid_bytes: int = 0
    unnatural_entries: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    invalid_by_reason: dict[str, int] = field(default_factory=dict)  # entries

    def add_plan(self, plan: ReportPlan, buffers: int = 1) -> None:
        self.buffers += buffers
        self.entries += plan.entries
        self.reported_bytes += plan.reported_bytes
        self.invalid_entries += len(plan.invalid)
        self.invalid_bytes += plan.invalid_bytes
        self.unnatural_entries += len(plan.unnatural)
        for reason, nbytes in plan.skipped.items():
            self.add_skipped(reason, nbytes)
        for _, reason in plan.invalid:
            self.invalid_by_reason[reason.value] = self.invalid_by_reason.get(reason.value, 0) + 1

    def add_skipped(self, reason: Skip, nbytes: int) -> None:
        self.skipped_bytes += nbytes
        self.skipped_by_reason[reason.value] = self.skipped_by_reason.get(reason.value, 0) + nbytes

    def describe(self) -> dict:
        return {
            "report-buffers": self.buffers,
            "report-entries": self.entries,
            "reported-bytes": self.reported_bytes,
            "report-freed-bytes": self.freed_bytes,
            "report-freed-bytes-measured": self.freed_measured,
            "report-skipped-bytes": self.skipped_bytes,
            "report-skipped": dict(self.skipped_by_reason),
            "report-invalid-entries": self.invalid_entries,
            "report-invalid-bytes": self.invalid_bytes,
            "report-invalid": dict(self.invalid_by_reason),
            "report-unnatural-entries": self.unnatural_entries,
        }


__all__ = [
    "Invalid",
    "PAGE_REPORTING_CAPACITY",
    "ReportCounters",
    "ReportPlan",
    "Skip",
    "plan_report",
]
