"""Huge pages: what backs each region of guest RAM, and when to free partial ones.

The guest balloons 4 KiB pages in effectively random order.  Guest RAM on
shmem may be backed by 2 MiB transparent huge pages (THP), and on hugetlbfs
every page is a huge page.  Punching one 4 KiB hole into a THP splits it (and
freeing 1 GiB a page at a time costs ~200x more than in 2 MiB pieces); on
hugetlbfs a partial punch frees nothing (the kernel zeroes the range).  So
the native tracker (csrc/track.c) counts ballooned pages per huge page, by
file offset, and hands out a huge page as one range when all of it is
ballooned.  What remains are *pending* pages of partly ballooned huge pages;
this module decides when those are freed anyway:

- ``eager``: at once, as the guest gives them (splits THPs; QEMU-like, minus
  QEMU's one-huge-page memory);
- ``whole``: never; only whole huge pages are freed and no THP is split;
- ``auto`` (default): whole huge pages at once, partial ones when the guest
  has reached its target, when too much is pending, or when they have waited
  too long (``FlushPolicy``).

On hugetlbfs, partial pages stay pending under every policy: punching them
would free nothing.

Backing detection reads fstatfs (through the native core), sysfs and
/proc/self; the policy (``FlushPolicy``) is pure.  ``HugePageTracker`` is the
small piece of glue the session calls; it does no I/O of its own except
detection when regions appear (sysfs reads) and the discard it is asked to
run (in a worker thread).
"""

from __future__ import annotations

import enum
import math
import os
import re
import time
from dataclasses import dataclass, field

from ..native import PAGE_SIZE, DiscardStats, GuestMemory, PfnArray, RangeList, fd_backing

THP_SYSFS = "/sys/kernel/mm/transparent_hugepage"

# x86-64 PMD size; only used when sysfs does not say (THP compiled out, in
# which case shmem has no huge pages anyway and this is never tracked).
FALLBACK_PMD_SIZE = 2 << 20
# Plain shmem is tracked in blocks of this size (Backing.granule).
BATCH_GRANULE = 2 << 20

# Why these defaults (auto policy).  The operator's target must show up in
# host memory soon after the guest reaches it, without splitting THPs that
# would have completed a moment later:
# - A Linux guest sends one 256-PFN buffer at a time and waits for it, so a
#   2 MiB block it gives up in a run completes within a couple of buffers,
#   i.e. milliseconds.  Pages still partial after seconds will most likely
#   stay partial; 5 s is three orders of magnitude past that, and short next
#   to how long an operator waits for a balloon change to show.
# - The moment the guest reports reaching its target (``actual ==
#   num_pages``) no more pages are coming, so auto flushes then without
#   waiting for the deadline: the deadline only matters for a guest that
#   stalls short of its target.
# - 1 GiB bounds what may be owed to the host at any time. It is large on
#   purpose: a guest that balloons in uniform random order completes its huge
#   pages only near the end, and a lower bound flushed mid-balloon splits
#   pages that would have completed (scripts/bench.py, scenario
#   all-random-thpon-flush64m against all-random-thpon: 1 GiB THP, random
#   order, flushing every 64 MiB split 511 huge pages and took 899 ms of
#   back-end CPU; flushing at the target split none and took 74 ms). The target and the deadline already bound how long
#   pages wait.
DEFAULT_FLUSH_BYTES = 1 << 30
DEFAULT_FLUSH_AFTER = 5.0  # seconds


class HugePolicy(str, enum.Enum):
    EAGER = "eager"
    WHOLE = "whole"
    AUTO = "auto"


# ---- backing detection ---------------------------------------------------------


@dataclass(frozen=True)
class Backing:
    """What backs one region's fd, and how the tracker treats it."""

    kind: str  # "shmem" | "hugetlbfs" | "file"
    huge_page_size: int  # bytes; PAGE_SIZE when there are no huge pages to care about
    thp: str  # "yes" | "no" | "advise" (advise: huge only where the mapping is madvised)
    thp_setting: str | None = None  # where that verdict comes from, for the operator

    @property
    def thp_possible(self) -> bool:
        return self.thp != "no"

    @property
    def granule(self) -> int:
        """Block size the tracker counts in; PAGE_SIZE frees pages as they come.
        Plain shmem (no huge page possible) is counted in 2 MiB blocks too,
        only to free across buffers in large ranges: a block is freed when
        complete, and its pages wait at most until the guest reaches its
        target or its inflate queue is quiet for 10 ms (csrc/serve.c), under
        every policy."""
        if self.kind == "hugetlbfs" or (self.kind == "shmem" and self.thp_possible):
            return self.huge_page_size
        if self.kind == "shmem":
            return BATCH_GRANULE
        return PAGE_SIZE


def sysfs_choice(path: str) -> str | None:
    """The selected value of a sysfs choice file ("always [madvise] never")."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    match = re.search(r"\[([\w-]+)\]", text)
    return match.group(1) if match else None


def pmd_size(thp_root: str = THP_SYSFS) -> int:
    """Size of a PMD-mapped THP (hpage_pmd_size)."""
    try:
        with open(os.path.join(thp_root, "hpage_pmd_size"), encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return FALLBACK_PMD_SIZE


_THP_VERDICT = {"always": "yes", "within_size": "yes", "force": "yes", "advise": "advise"}


def _tmpfs_huge_option(fd: int, proc_root: str) -> tuple[str, str] | None:
    """(mount point, huge= option) if fd lies on a tmpfs mount listed in
    mountinfo; None for the kernel's internal mount (memfd_create)."""
    try:
        with open(os.path.join(proc_root, "fdinfo", str(fd)), encoding="ascii") as f:
            mnt_id = next(line.split()[1] for line in f if line.startswith("mnt_id:"))
        with open(os.path.join(proc_root, "mountinfo"), encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except (OSError, StopIteration, IndexError):
        return None
    for line in lines:
        fields = line.split()
        if fields and fields[0] == mnt_id and " - " in line:
            fstype, _source, options = (line.split(" - ", 1)[1].split() + ["", ""])[:3]
            if fstype != "tmpfs":
                return None
            huge = re.search(r"(?:^|,)huge=([\w-]+)", options)
            return fields[4], huge.group(1) if huge else "never"
    return None


def shmem_thp(fd: int, thp_root: str = THP_SYSFS, proc_root: str = "/proc/self") -> tuple[str, str]:
    """Whether shmem THP can back fd: ("yes" | "no" | "advise", why).

    As observed on Linux 6.18 (mm/shmem.c): the top-level ``shmem_enabled``
    values deny and force override everything.  A file on a tmpfs mount
    follows that mount's ``huge=`` option (default never).  A memfd lives on
    the kernel's internal mount: it needs ``shmem_enabled`` other than never,
    and then the per-size ``hugepages-<PMD>kB/shmem_enabled`` decides unless
    it says inherit.
    """
    top = sysfs_choice(os.path.join(thp_root, "shmem_enabled"))
    if top is None:
        return "no", "no shmem THP support (no shmem_enabled in sysfs)"
    if top == "deny":
        return "no", "shmem_enabled=deny"
    if top == "force":
        return "yes", "shmem_enabled=force"
    mount = _tmpfs_huge_option(fd, proc_root)
    if mount is not None:
        where, huge = mount
        return _THP_VERDICT.get(huge, "no"), f"tmpfs {where} huge={huge}"
    if top == "never":
        return "no", "shmem_enabled=never"
    size_kb = pmd_size(thp_root) >> 10
    per_size = sysfs_choice(os.path.join(thp_root, f"hugepages-{size_kb}kB", "shmem_enabled"))
    effective = top if per_size in (None, "inherit") else per_size
    why = f"shmem_enabled={top}"
    if per_size is not None:
        why += f", hugepages-{size_kb}kB/shmem_enabled={per_size}"
    return _THP_VERDICT.get(effective, "no"), why


def detect_backing(fd: int, thp_root: str = THP_SYSFS, proc_root: str = "/proc/self") -> Backing:
    kind, block = fd_backing(fd)
    if kind == "hugetlbfs":
        return Backing("hugetlbfs", block, "no", f"hugetlbfs page size {block}")
    if kind == "shmem":
        thp, why = shmem_thp(fd, thp_root, proc_root)
        return Backing("shmem", pmd_size(thp_root) if thp != "no" else PAGE_SIZE, thp, why)
    return Backing("file", PAGE_SIZE, "no", None)


_SMAPS_HUGE_FIELDS = ("ShmemPmdMapped", "FilePmdMapped", "Shared_Hugetlb", "Private_Hugetlb")


def mapped_huge_bytes(memory: GuestMemory, smaps: str = "/proc/self/smaps") -> dict[int, int]:
    """Per region: bytes our own mapping maps with huge pages right now
    (ShmemPmdMapped + FilePmdMapped + *_Hugetlb of /proc/self/smaps).

    Non-zero proves the region is backed by huge pages.  It only covers what
    this process has touched (the rings, mostly), so it is a lower bound on
    the region's huge pages, not a census; reading it walks our page tables.
    """
    spans = {r.index: (memory.host_address(r.index), r.size) for r in memory.regions}
    totals = dict.fromkeys(spans, 0)
    current: list[int] = []
    header = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")
    with open(smaps, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = header.match(line)
            if m:
                start, end = int(m.group(1), 16), int(m.group(2), 16)
                current = [i for i, (host, size) in spans.items() if start < host + size and host < end]
                continue
            if current and line.split(":", 1)[0] in _SMAPS_HUGE_FIELDS:
                kb = int(line.split()[1])
                for i in current:
                    totals[i] += kb << 10
    return totals


# ---- policy -----------------------------------------------------------------------


@dataclass(frozen=True)
class PendingState:
    """The tracker's pending pages at one moment."""

    collectable_bytes: int  # pending pages a flush would free
    oldest_age: float | None  # seconds the oldest of them has waited (None: none pending)
    held_bytes: int = 0  # pending pages no flush frees (hugetlbfs): they wait for their huge page


@dataclass(frozen=True)
class FlushPolicy:
    """When to free ballooned pages of partly ballooned huge pages.  Pure."""

    mode: HugePolicy = HugePolicy.AUTO
    flush_bytes: int = DEFAULT_FLUSH_BYTES
    flush_after: float = DEFAULT_FLUSH_AFTER

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", HugePolicy(self.mode))
        if self.flush_bytes < 0 or not (0 <= self.flush_after < math.inf):
            raise ValueError(f"flush_bytes {self.flush_bytes} and flush_after {self.flush_after} must be >= 0")

    def should_flush(self, state: PendingState, *, guest_at_target: bool = False) -> bool:
        """Free the collectable pending pages now?  guest_at_target: the guest
        has reported reaching its target, so no page still to come can
        complete a huge page."""
        if state.collectable_bytes == 0 or self.mode is HugePolicy.WHOLE:
            return False
        if self.mode is HugePolicy.EAGER or guest_at_target or state.collectable_bytes >= self.flush_bytes:
            return True
        return state.oldest_age is not None and state.oldest_age >= self.flush_after

    def flush_delay(self, state: PendingState) -> float | None:
        """Seconds from the moment of state until a timed flush is due, or
        None when none will be (nothing collectable pending, or ``whole``)."""
        if state.collectable_bytes == 0 or self.mode is HugePolicy.WHOLE:
            return None
        if self.mode is HugePolicy.EAGER or state.oldest_age is None:
            return 0.0
        return max(0.0, self.flush_after - state.oldest_age)


# ---- glue for the session ------------------------------------------------------------


@dataclass
class HugePageTracker:
    """One connection's huge page tracking: region setup, the per-batch
    calls, and the policy's questions.  Every method except ``discard`` runs
    under the session's memory lock on the event loop; ``discard`` runs in a
    worker thread with that lock still held."""

    memory: GuestMemory
    policy: FlushPolicy = field(default_factory=FlushPolicy)
    thp_root: str = THP_SYSFS
    proc_root: str = "/proc/self"
    backings: dict[tuple[int, int], Backing] = field(default_factory=dict)  # by (gpa, size)

    def configure_regions(self) -> list[tuple[int, Backing]]:
        """Detect and set up tracking for regions added since the last call
        (call after every memory table change).  Returns what it found."""
        found = []
        live = set()
        for r in self.memory.regions:
            live.add((r.gpa, r.size))
            if r.track_configured:
                continue
            backing = detect_backing(r.fd, self.thp_root, self.proc_root)
            self.memory.configure_huge_pages(r.index, backing.granule, backing.kind, backing.thp_possible)
            self.backings[(r.gpa, r.size)] = backing
            found.append((r.index, backing))
        for key in set(self.backings) - live:
            del self.backings[key]
        return found

    def inflated(self, changed: RangeList | PfnArray) -> RangeList:
        """After an inflate batch (the ranges that flipped): what to free now
        (whole huge pages, and pages of regions that do not defer)."""
        return self.memory.track_inflate(changed)

    def deflated(self, changed: RangeList | PfnArray) -> int:
        """After a deflate batch (its ranges): those pages will never be freed now."""
        return self.memory.track_deflate(changed)

    def state(self, now_ns: int | None = None) -> PendingState:
        collectable, since = self.memory.pending(collectable_only=True)
        total, _ = self.memory.pending()
        now_ns = time.monotonic_ns() if now_ns is None else now_ns  # CLOCK_MONOTONIC, as in C
        age = None if since is None else max(0, now_ns - since) / 1e9
        return PendingState(collectable, age, total - collectable)

    def flush_due(self, *, guest_at_target: bool = False) -> bool:
        return self.policy.should_flush(self.state(), guest_at_target=guest_at_target)

    def flush_delay(self) -> float | None:
        return self.policy.flush_delay(self.state())

    def collect(self) -> RangeList:
        """Take the collectable pending pages (call only when flush_due says so)."""
        return self.memory.collect_pending()

    def collect_batch(self) -> RangeList:
        """Take the pending pages of plain shmem regions (any policy, any time)."""
        return self.memory.collect_pending_batch()

    def discard(self, ranges: RangeList) -> DiscardStats:
        """Free ranges.  Blocking: run it in a worker thread, lock held."""
        return self.memory.discard_ranges(ranges)

    def describe(self) -> dict:
        """Figures for query-balloon (dash style, as the rest of it)."""
        state = self.state()
        regions = []
        for r in self.memory.regions:
            b = self.backings.get((r.gpa, r.size))
            regions.append({
                "gpa": hex(r.gpa),
                "backing": r.backing,
                "huge-page-size": b.huge_page_size if b else r.huge_page_size,
                "tracking-block": r.huge_page_size,
                "thp": b.thp if b else "no",
                "thp-setting": b.thp_setting if b else None,
                "pending-bytes": r.pending_pages * PAGE_SIZE,
            })
        return {
            "huge-page-policy": self.policy.mode.value,
            "flush-bytes": self.policy.flush_bytes,
            "flush-after": self.policy.flush_after,
            "pending-bytes": state.collectable_bytes + state.held_bytes,
            "pending-hugetlbfs-bytes": state.held_bytes,
            "oldest-pending-seconds": state.oldest_age,
            "regions": regions,
        }


def describe_discards(stats: DiscardStats) -> dict:
    """The huge page side of accumulated DiscardStats, for query-balloon."""
    return {
        "huge-pages-freed-whole": stats.huge_pages_whole,
        "thp-splits": stats.splits,
        "hugetlbfs-partial-bytes": stats.hugetlb_partial_bytes,
        "freed-shmem-bytes": stats.bytes_shmem,
        "freed-hugetlbfs-bytes": stats.bytes_hugetlbfs,
        "freed-file-bytes": stats.bytes_file,
    }


__all__ = [
    "Backing",
    "DEFAULT_FLUSH_AFTER",
    "DEFAULT_FLUSH_BYTES",
    "FlushPolicy",
    "HugePageTracker",
    "HugePolicy",
    "PendingState",
    "describe_discards",
    "detect_backing",
    "mapped_huge_bytes",
    "pmd_size",
    "shmem_thp",
    "sysfs_choice",
]
