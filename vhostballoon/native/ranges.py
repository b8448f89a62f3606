"""Values that cross into and out of the C core: page and range lists,
region descriptions, discard figures, a balloon update's result."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._native import ffi, lib

from ._base import BACKING_KINDS, PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from .memory import GuestMemory


@dataclass(frozen=True)
class RegionInfo:
    index: int
    gpa: int
    size: int
    uaddr: int
    mmap_offset: int
    fd: int
    ballooned_pages: int
    discard_errno: int
    discard_method: str  # "untried" | "fallocate" | "madvise"
    backing: str = "file"  # "shmem" | "hugetlbfs" | "file" (fstatfs of fd)
    fs_block: int = 0  # f_bsize: the huge page size on hugetlbfs
    huge_page_size: int = PAGE_SIZE  # tracked granule; PAGE_SIZE = freed page by page at once
    thp: bool = False  # partial punches may split a transparent huge page here
    track_configured: bool = False
    pending_pages: int = 0  # ballooned, held back until their huge page completes or a flush


@dataclass
class DiscardStats:
    bytes_freed: int = 0
    bytes_failed: int = 0
    ranges: int = 0
    syscalls: int = 0
    pages_outside: int = 0
    last_errno: int = 0
    failed_region: int = -1
    # By the region's huge page size, by file offset (vb.h vb_discard_stats):
    huge_pages_whole: int = 0  # whole huge pages freed (THP-possible shmem, hugetlbfs)
    splits: int = 0  # THP-possible huge pages first punched in part (once until freed whole): THP splits
    hugetlb_partial_bytes: int = 0  # hugetlbfs bytes outside whole huge pages: zeroed, not freed
    bytes_shmem: int = 0  # bytes_freed by backing kind
    bytes_hugetlbfs: int = 0
    bytes_file: int = 0

    _SUMMED = (
        "bytes_freed", "bytes_failed", "ranges", "syscalls", "pages_outside", "huge_pages_whole",
        "splits", "hugetlb_partial_bytes", "bytes_shmem", "bytes_hugetlbfs", "bytes_file",
    )

    @classmethod
    def _from_c(cls, st) -> DiscardStats:
        return cls(
            bytes_freed=st.bytes_freed,
            bytes_failed=st.bytes_failed,
            ranges=st.ranges,
            syscalls=st.syscalls,
            pages_outside=st.pages_outside,
            last_errno=st.last_errno,
            failed_region=st.failed_region,
            huge_pages_whole=st.huge_whole,
            splits=st.huge_split,
            hugetlb_partial_bytes=st.hugetlb_partial_bytes,
            bytes_shmem=st.bytes_shmem,
            bytes_hugetlbfs=st.bytes_hugetlbfs,
            bytes_file=st.bytes_file,
        )

    def add(self, other: DiscardStats) -> None:
        """Accumulate other's totals; its failure (if any) becomes the latest."""
        for name in self._SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.failed_region >= 0 or other.last_errno:
            self.last_errno = other.last_errno
            self.failed_region = other.failed_region


class PfnArray:
    """A batch of 4 KiB page numbers in C memory (uint32_t[capacity]).

    ``n`` is how many are in use.  Kept in C so a batch of hundreds of
    thousands of PFNs goes from the ring to the discard engine without a
    Python list.
    """

    __slots__ = ("capacity", "n", "cdata")

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"PfnArray capacity {capacity} is negative")
        self.capacity = capacity
        self.n = 0
        self.cdata = ffi.new("uint32_t[]", max(capacity, 1))

    @classmethod
    def from_list(cls, pfns: Sequence[int]) -> PfnArray:
        arr = cls(len(pfns))
        if pfns:
            try:
                arr.cdata[0 : len(pfns)] = pfns
            except OverflowError as exc:
                raise ValueError(f"PFN does not fit in 32 bits: {exc}") from None
        arr.n = len(pfns)
        return arr

    def tolist(self) -> list[int]:
        return ffi.unpack(self.cdata, self.n) if self.n else []

    def view(self):
        """The PFNs in use as le32 bytes (a buffer over the C array, no copy)."""
        return ffi.buffer(self.cdata, 4 * self.n)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        head = self.tolist()[:8]
        more = ", ..." if self.n > 8 else ""
        return f"PfnArray(n={self.n}, capacity={self.capacity}, [{', '.join(map(hex, head))}{more}])"


class RangeList:
    """Guest-physical byte ranges in C memory (vb_range[capacity]), as the
    huge page tracker hands them out and ``GuestMemory.discard_ranges``
    frees them.  ``n`` is how many are in use."""

    __slots__ = ("capacity", "n", "cdata")

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"RangeList capacity {capacity} is negative")
        self.capacity = capacity
        self.n = 0
        self.cdata = ffi.new("vb_range[]", max(capacity, 1))

    @classmethod
    def from_list(cls, ranges: Sequence[tuple[int, int]]) -> RangeList:
        out = cls(len(ranges))
        for i, (gpa, length) in enumerate(ranges):
            if not (0 <= gpa < 1 << 64 and 0 <= length < 1 << 64):
                raise ValueError(f"range gpa {gpa:#x} length {length:#x} is not 64-bit")
            out.cdata[i].gpa = gpa
            out.cdata[i].len = length
        out.n = len(ranges)
        return out

    @classmethod
    def from_pairs(cls, pairs) -> RangeList:
        """A list from native u64s laid out gpa0, len0, gpa1, len1, ... (an
        ``array('Q')``: a vb_range is two u64), copied at C speed: for lists
        of hundreds of thousands of ranges, where ``from_list`` is slow."""
        with memoryview(pairs) as view:
            if view.format not in ("Q", "L") or view.itemsize != 8 or len(view) % 2:
                raise ValueError(f"RangeList.from_pairs takes an even number of u64s, not {len(view)} "
                                 f"items of format {view.format!r}")
            out = cls(len(view) // 2)
            ffi.memmove(out.cdata, view, view.nbytes)
        out.n = out.capacity
        return out

    @classmethod
    def from_pfns(cls, pfns: PfnArray | Sequence[int], memory: GuestMemory | None = None) -> RangeList:
        """Page numbers as ranges, in their order, consecutive ascending ones
        joined (not across a region end of ``memory``), as the PFN32 sink
        makes them from a buffer: nothing dropped, nothing sorted."""
        if not isinstance(pfns, PfnArray):
            pfns = PfnArray.from_list(pfns)
        out = cls(pfns.n)
        mem = ffi.NULL if memory is None else memory._table()
        out.n = lib.vb_ranges_from_pfns(mem, pfns.cdata, pfns.n, out.cdata)
        return out

    def pfns(self) -> list[int]:
        """The 4 KiB page numbers the ranges cover, in order (for tests and logs)."""
        out: list[int] = []
        for gpa, length in self.tolist():
            first = gpa >> PAGE_SHIFT
            out.extend(range(first, first + ((length + PAGE_SIZE - 1) >> PAGE_SHIFT)))
        return out

    @property
    def pages(self) -> int:
        return sum((self.cdata[i].len + PAGE_SIZE - 1) >> PAGE_SHIFT for i in range(self.n))

    def __add__(self, other: RangeList) -> RangeList:
        """Both lists' ranges, self's first (a new list)."""
        out = RangeList(self.n + other.n)
        size = ffi.sizeof("vb_range")
        ffi.memmove(out.cdata, self.cdata, self.n * size)
        ffi.memmove(out.cdata + self.n, other.cdata, other.n * size)
        out.n = self.n + other.n
        return out

    def tolist(self) -> list[tuple[int, int]]:
        return [(self.cdata[i].gpa, self.cdata[i].len) for i in range(self.n)]

    @property
    def total_bytes(self) -> int:
        return sum(self.cdata[i].len for i in range(self.n))

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        head = ", ".join(f"{gpa:#x}+{length:#x}" for gpa, length in self.tolist()[:6])
        more = ", ..." if self.n > 6 else ""
        return f"RangeList(n={self.n}, [{head}{more}])"


@dataclass(frozen=True)
class DescRange:
    """One descriptor of a buffer popped with ``Virtqueue.pop_ranges``, as the
    driver wrote it; its address is unchecked (validate before use)."""

    addr: int
    length: int
    flags: int


def fd_backing(fd: int) -> tuple[str, int]:
    """What fd lives on, by fstatfs: ("shmem" | "hugetlbfs" | "file", f_bsize)."""
    block = ffi.new("uint64_t *")
    code = lib.vb_fd_backing(fd, block)
    if code < 0:
        err = ffi.errno
        raise OSError(err, f"fstatfs of fd {fd}: {os.strerror(err)}")
    return BACKING_KINDS[code], block[0]


@dataclass
class BalloonUpdate:
    changed: RangeList      # pages whose state flipped, as ranges in input order
    n_invalid: int          # pages outside guest memory (ignored)
    first_invalid: int | None  # the first of them, a PFN
    n_unchanged: int        # already in the requested state (incl. duplicates)
    first_unchanged: int | None = None  # the first of them, a PFN
    refused: int = 0        # whole: inflate ranges refused (already partly ballooned)


# Why the extents sink or a whole update refused a range (vb_core.h VB_REFUSE_*).
